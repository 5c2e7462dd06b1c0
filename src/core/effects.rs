//! The effects of a service's step, carried out in order by the driver.
//!
//! A service decides synchronously and records what must happen: batches to store,
//! audit entries, events, and points at which the frames queued so far go out. The core
//! carries them out in the order recorded ([`Core::carry_out`]), awaiting each store
//! batch before what follows, so "stored before sent" holds as the service wrote it.

use hearth_storage::Batch;

use super::Core;
use crate::Error;

/// One effect.
pub(crate) enum Effect {
    /// Store this batch; later effects wait for it, and a failure stops the rest.
    Persist(Batch),
    /// Store this batch; a failure is logged (naming what) and the rest still happens.
    PersistOrLog(Batch, &'static str),
    /// Append an audit entry.
    Audit {
        actor: String,
        action: &'static str,
        subject: String,
    },
    /// Announce an event.
    Emit(crate::events::Event),
    /// Send these frames: the ones the step queued before it recorded this.
    Send(Vec<(String, hearth_crdt::wire::Frame)>),
    /// Queue these frames on the peers' ephemeral streams (the alert lane), which do not
    /// wait behind queued sync frames.
    SendEphemeral(Vec<(hearth_net::PeerId, hearth_net::Bytes)>),
    /// Forget admitted devices of a paired home (after the frames to them went out).
    ForgetForeign(Vec<String>),
    /// Close a peer's connections and refuse it from now on (see `hearth_net::Handle::reject`).
    Reject {
        peer: hearth_net::PeerId,
        reason: &'static str,
    },
}

/// Effects in the order a step recorded them.
#[derive(Default)]
pub(crate) struct Effects(Vec<Effect>);

impl Effects {
    pub(crate) fn persist(&mut self, batch: Batch) {
        if !batch.is_empty() {
            self.0.push(Effect::Persist(batch));
        }
    }

    /// Stores `batch` where a failure must not stop what follows; it is logged.
    pub(crate) fn persist_or_log(&mut self, batch: Batch, what: &'static str) {
        if !batch.is_empty() {
            self.0.push(Effect::PersistOrLog(batch, what));
        }
    }

    pub(crate) fn audit(&mut self, actor: &str, action: &'static str, subject: String) {
        self.0.push(Effect::Audit {
            actor: actor.to_string(),
            action,
            subject,
        });
    }

    pub(crate) fn emit(&mut self, event: crate::events::Event) {
        self.0.push(Effect::Emit(event));
    }

    /// Sends `frames` at this point of the log: after the batches recorded before.
    pub(crate) fn send(&mut self, frames: Vec<(String, hearth_crdt::wire::Frame)>) {
        if !frames.is_empty() {
            self.0.push(Effect::Send(frames));
        }
    }

    /// Queues `frames` on the peers' ephemeral streams at this point of the log.
    pub(crate) fn send_ephemeral(&mut self, frames: Vec<(hearth_net::PeerId, hearth_net::Bytes)>) {
        if !frames.is_empty() {
            self.0.push(Effect::SendEphemeral(frames));
        }
    }

    pub(crate) fn forget_foreign(&mut self, peers: Vec<String>) {
        self.0.push(Effect::ForgetForeign(peers));
    }

    pub(crate) fn reject(&mut self, peer: hearth_net::PeerId, reason: &'static str) {
        self.0.push(Effect::Reject { peer, reason });
    }

    /// A point in the log, for [`Effects::join_persists_since`].
    pub(crate) fn mark(&self) -> usize {
        self.0.len()
    }

    /// Makes every batch recorded since `mark` one batch, stored where the first of them
    /// was: a step whose writes must land together or not at all (a revocation and the key
    /// rotation that goes with it) cannot be cut between them by a crash.
    pub(crate) fn join_persists_since(&mut self, mark: usize) {
        let tail: Vec<Effect> = self.0.drain(mark.min(self.0.len())..).collect();
        let mut joined_at: Option<usize> = None;
        for effect in tail {
            match (effect, joined_at) {
                (Effect::Persist(batch), Some(at)) => {
                    if let Effect::Persist(joined) = &mut self.0[at] {
                        joined.append(batch);
                    }
                }
                (Effect::Persist(batch), None) => {
                    joined_at = Some(self.0.len());
                    self.0.push(Effect::Persist(batch));
                }
                (other, _) => self.0.push(other),
            }
        }
    }
}

impl Core {
    /// Carries out `effects` in order. A batch the store refuses stops the rest (nothing
    /// after it may claim it was stored) and is the answer; only the effects that take
    /// access away (forgetting a paired home's devices, refusing a peer) still happen, as
    /// memory already says they are gone.
    pub(crate) async fn carry_out(&mut self, effects: Effects) -> Result<(), Error> {
        let mut failed = None;
        for effect in effects.0 {
            if failed.is_some()
                && !matches!(effect, Effect::ForgetForeign(_) | Effect::Reject { .. })
            {
                continue;
            }
            match effect {
                Effect::Persist(batch) => {
                    // A failed store keeps what the batch carried, to store it again once
                    // it recovers (store_in_order).
                    if let Err(error) = self.store_in_order(batch).await {
                        failed = Some(error);
                    }
                }
                Effect::PersistOrLog(batch, what) => {
                    if let Err(error) = self.store_in_order(batch).await {
                        tracing::error!(%error, "cannot store {what}");
                    }
                }
                Effect::Audit {
                    actor,
                    action,
                    subject,
                } => crate::audit::record_by(&self.store, &actor, action, &subject).await,
                Effect::Emit(event) => self.emit_event(event),
                Effect::Send(frames) => {
                    self.outbox.extend(frames);
                    self.send_pending().await;
                }
                Effect::SendEphemeral(frames) => {
                    for (peer, bytes) in frames {
                        let len = bytes.len();
                        match self.net.send_ephemeral(peer, bytes).await {
                            Ok(hearth_net::SendOutcome::Queued) => {
                                self.metrics.ephemeral(false, len)
                            }
                            // A copy that did not go is sent again by its retry.
                            Ok(outcome) => {
                                tracing::debug!(%peer, ?outcome, "ephemeral frame not queued")
                            }
                            Err(error) => {
                                tracing::debug!(%peer, %error, "ephemeral frame not sent")
                            }
                        }
                    }
                }
                Effect::ForgetForeign(peers) => {
                    for peer in peers {
                        self.sharing.foreign.remove(&peer);
                        self.engine.detach_peer(&peer);
                    }
                }
                Effect::Reject { peer, reason } => {
                    if let Err(error) = self.net.reject(peer, reason).await {
                        tracing::warn!(%peer, %error, "cannot refuse a peer");
                    }
                }
            }
        }
        match failed {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }

    /// Runs a step that records effects, carries them out (also when the step failed
    /// part way, as the effects it recorded already happened in its logic), and answers
    /// with the step's result unless carrying out failed. Frames the step queued and did
    /// not hand to a send effect go out last, after every batch it recorded; when a batch
    /// fails, the frames after it never go out.
    pub(crate) async fn step<T>(
        &mut self,
        run: impl FnOnce(&mut Self, &mut Effects) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let earlier = std::mem::take(&mut self.outbox);
        let mut effects = Effects::default();
        let result = run(self, &mut effects);
        let rest = std::mem::replace(&mut self.outbox, earlier);
        effects.send(rest);
        self.carry_out(effects).await?;
        result
    }

    /// Hands the frames queued so far to a send effect at this point of the log.
    pub(crate) fn send_queued(&mut self, fx: &mut Effects) {
        fx.send(std::mem::take(&mut self.outbox));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_storage::Keyspace;

    fn batch(key: &str) -> Batch {
        let mut b = Batch::new();
        b.put(Keyspace::Meta, key.as_bytes(), b"v".to_vec());
        b
    }

    fn keys(b: &Batch) -> Vec<Vec<u8>> {
        b.ops()
            .iter()
            .map(|op| match op {
                hearth_storage::BatchOp::Put { key, .. }
                | hearth_storage::BatchOp::Delete { key, .. } => key.clone(),
            })
            .collect()
    }

    #[test]
    fn batches_since_a_mark_become_one_stored_where_the_first_was() {
        let mut fx = Effects::default();
        fx.persist(batch("before"));
        let mark = fx.mark();
        fx.persist(batch("a"));
        fx.audit("me", "share.revoked", "x".into());
        fx.persist(batch("b"));
        fx.persist_or_log(batch("logged"), "something");
        fx.persist(batch("c"));
        fx.join_persists_since(mark);
        let shape: Vec<String> =
            fx.0.iter()
                .map(|e| match e {
                    Effect::Persist(b) => format!("persist {:?}", keys(b)),
                    Effect::PersistOrLog(b, _) => format!("or-log {:?}", keys(b)),
                    Effect::Audit { action, .. } => format!("audit {action}"),
                    _ => "other".into(),
                })
                .collect();
        let k = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            shape,
            vec![
                format!("persist {:?}", vec![k("before")]),
                format!("persist {:?}", vec![k("a"), k("b"), k("c")]),
                "audit share.revoked".to_string(),
                format!("or-log {:?}", vec![k("logged")]),
            ]
        );
    }
}
