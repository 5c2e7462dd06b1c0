//! Locks on the home's devices that are not the arbiter: their requests go to the
//! arbiter (the admin device) in grant frames on the sync stream and wait for its answer,
//! at most [`FORWARD_TIMEOUT_MS`]; the arbiter tells every connected device of each
//! change, and sends its whole table to a device when it is admitted, so every device
//! reads the table with at most one round trip of lag.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::arbiter::LockRecord;
use super::{LockAction, LockAsk, LockInfo, LockOutcome, LockType, ReleaseOutcome};
use crate::Error;
use crate::core::{Core, Reply, now_ms};
use crate::trust::messages::{MAX_SHARE_MESSAGE, ShareMessage};

/// How long a forwarded request waits for the arbiter's answer.
pub(crate) const FORWARD_TIMEOUT_MS: u64 = 5_000;
/// Forwarded requests waiting at once; more are refused at once.
pub(crate) const MAX_FORWARDS: usize = 1024;
/// Requests of one paired home's device this admin device passes on at once.
const MAX_RELAYS_PER_PEER: usize = 64;
/// Locks per table message, so one stays under the grant message cap.
const TABLE_CHUNK: usize = 2;

/// What devices of one home say about locks.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum LockMessage {
    /// A request, to the arbiter.
    Ask {
        id: u64,
        device_name: String,
        lock_type: LockType,
        user_id: String,
        timeout_s: u64,
        reason: Option<String>,
        plan_uid: Option<String>,
    },
    /// A release, to the arbiter.
    Release {
        id: u64,
        device_name: String,
        key: String,
        user_id: String,
    },
    /// A read of the lock on one device, to the arbiter (from a paired home's device, for
    /// an entity shared with it).
    Read { id: u64, device_name: String },
    /// The arbiter's answer to request `id`.
    Answer { id: u64, answer: Answer },
    /// A change of the arbiter's table.
    Changed {
        action: LockAction,
        lock: LockRecord,
    },
    /// Part of the arbiter's whole table; `first` starts it afresh.
    Table { first: bool, locks: Vec<LockRecord> },
    /// To the arbiter: send me your whole table (a device that learnt of a new arbiter).
    TableAsk,
    /// Handoff, from the admin to the arbiter: stop granting and send me your table.
    Yield { seq: u64 },
    /// Handoff, from the admin: handoffs started before `below` were given up; grant
    /// again if yielded to one of them.
    Resume { below: u64 },
    /// A signed naming of the arbiter (also in the home document), passed on so that a
    /// device learns it even if the home document's copy was tampered with.
    Naming { bytes: ByteBuf },
    /// Handoff: part `index` of `total` of a whole table (keys and counter included),
    /// from the yielding arbiter to the admin, and from the admin to the device named.
    Part {
        seq: u64,
        index: u32,
        total: u32,
        bytes: ByteBuf,
    },
    /// Handoff, from the device being named: the table is stored.
    Took { seq: u64 },
    /// Handoff: this device cannot take part, and why.
    HandoffFailed { seq: u64, message: String },
}

impl LockMessage {
    /// The device a request or release names; empty for other messages.
    fn device_name(&self) -> &str {
        match self {
            LockMessage::Ask { device_name, .. }
            | LockMessage::Release { device_name, .. }
            | LockMessage::Read { device_name, .. } => device_name,
            _ => "",
        }
    }

    /// The request an `Ask` carries.
    fn into_ask(self) -> Option<LockAsk> {
        match self {
            LockMessage::Ask {
                device_name,
                lock_type,
                user_id,
                timeout_s,
                reason,
                plan_uid,
                ..
            } => Some(LockAsk {
                device_name,
                lock_type,
                user_id,
                timeout: std::time::Duration::from_secs(timeout_s),
                reason,
                plan_uid,
            }),
            _ => None,
        }
    }
}

/// The arbiter's answer.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum Answer {
    Granted { lock: LockRecord, key: String },
    Refused { holder: LockRecord, message: String },
    Released { lock: LockRecord, forced: bool },
    Lock { lock: Option<LockRecord> },
    Failed { kind: Failure, message: String },
}

/// An error, as it crosses to the device that asked.
#[derive(Serialize, Deserialize)]
pub(crate) enum Failure {
    NotFound,
    Forbidden,
    Invalid,
    Unavailable,
}

impl Answer {
    fn failed(error: Error) -> Self {
        let kind = match &error {
            Error::NotFound(_) => Failure::NotFound,
            Error::Forbidden(_) => Failure::Forbidden,
            Error::Invalid(_) => Failure::Invalid,
            _ => Failure::Unavailable,
        };
        Answer::Failed {
            kind,
            message: error.to_string(),
        }
    }
}

impl Failure {
    fn into_error(self, message: String) -> Error {
        match self {
            Failure::NotFound => Error::NotFound(message),
            Failure::Forbidden => Error::Forbidden(message),
            Failure::Invalid => Error::Invalid(message),
            Failure::Unavailable => Error::ArbiterUnreachable(message),
        }
    }
}

/// Who waits for a forwarded request's answer.
pub(crate) enum Waiting {
    Request(Reply<LockOutcome>),
    Release(Reply<ReleaseOutcome>),
    Read(Reply<Option<LockInfo>>),
    /// A paired home's device, whose request this (admin) device passed on to this
    /// home's arbiter: the answer goes back to it under its own id.
    Relay {
        peer: String,
        id: u64,
    },
}

impl Waiting {
    fn fail(self, error: Error) {
        match self {
            Waiting::Relay { .. } => {}
            Waiting::Request(reply) => {
                let _ = reply.send(Err(error));
            }
            Waiting::Release(reply) => {
                let _ = reply.send(Err(error));
            }
            Waiting::Read(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    fn answer(self, answer: Answer) {
        match (self, answer) {
            (Waiting::Relay { .. }, _) => {}
            (Waiting::Request(reply), Answer::Granted { lock, key }) => {
                let _ = reply.send(Ok(LockOutcome::Granted {
                    lock: lock.into(),
                    key,
                }));
            }
            (Waiting::Request(reply), Answer::Refused { holder, message }) => {
                let _ = reply.send(Ok(LockOutcome::Refused {
                    holder: holder.into(),
                    message,
                }));
            }
            (Waiting::Release(reply), Answer::Released { lock, forced }) => {
                let lock = LockInfo::from(lock);
                let _ = reply.send(Ok(if forced {
                    ReleaseOutcome::ForceReleased(lock)
                } else {
                    ReleaseOutcome::Released(lock)
                }));
            }
            (Waiting::Read(reply), Answer::Lock { lock }) => {
                let _ = reply.send(Ok(lock.map(LockInfo::from)));
            }
            (waiting, Answer::Failed { kind, message }) => waiting.fail(kind.into_error(message)),
            (waiting, _) => waiting.fail(Error::Internal(
                "the arbiter answered a different kind of request".into(),
            )),
        }
    }
}

/// A forwarded request.
pub(crate) struct Forwarded {
    pub(crate) arbiter: String,
    pub(crate) deadline_ms: u64,
    pub(crate) waiting: Waiting,
}

/// This device's view of the locks when it is not the arbiter.
#[derive(Default)]
pub(crate) struct Mirror {
    /// The arbiter's table as it last said.
    pub(crate) table: BTreeMap<String, LockRecord>,
    /// Forwarded requests by id.
    pub(crate) forwarded: BTreeMap<u64, Forwarded>,
    pub(crate) next_id: u64,
}

fn encode(message: &LockMessage) -> Option<ShareMessage> {
    match crate::trust::wire::to_cbor("lock message", message) {
        Ok(bytes) => Some(ShareMessage::Lock {
            bytes: ByteBuf::from(bytes),
        }),
        Err(error) => {
            tracing::warn!(%error, "cannot encode a lock message");
            None
        }
    }
}

impl Core {
    /// The arbiter's PeerId: the home's unrevoked admin device, as its certificate said
    /// at admission, else as the home document lists it.
    pub(crate) fn lock_arbiter_peer(&self) -> Option<String> {
        if let Some(named) = &self.locks.naming {
            // A naming the root key signed decides; a revoked device decides nothing.
            return (!self.revocations.contains(&named.peer)).then(|| named.peer.clone());
        }
        if let Some(admin) = &self.peers.admin
            && !self.revocations.contains(admin)
        {
            return Some(admin.clone());
        }
        let devices = self.engine.home_devices(self.home.home_doc).ok()?;
        devices
            .into_iter()
            .find(|(peer, record)| {
                // Any device of the home can write the home document: only a certificate
                // the home's root key signed, for this very device, counts.
                record.revoked_at.is_none()
                    && !self.revocations.contains(peer)
                    && matches!(
                        crate::trust::cert::DeviceCert::verify_bytes(
                            &record.certificate,
                            &self.home.root_public
                        ),
                        crate::trust::cert::Verdict::Valid(c) if c.is_admin() && c.peer_id() == peer.as_str()
                    )
            })
            .map(|(peer, _)| peer)
    }

    pub(crate) fn queue_lock_message(&mut self, peer: &str, message: &LockMessage) {
        if let Some(message) = encode(message) {
            self.queue_share_message(peer, &message);
        }
    }

    /// Where a request about `device` goes: the owner home's arbiter for an entity another
    /// home shares with this one (refused here when the share is read-only), else this
    /// home's arbiter. `Ok(None)`: this device decides.
    pub(crate) fn lock_route(&self, device: &str) -> Result<Option<String>, Error> {
        if let Some(route) = self.shared_in_lock_route(device, true) {
            return route.map(Some);
        }
        if self.is_lock_arbiter() {
            return Ok(None);
        }
        match self.lock_arbiter_peer() {
            Some(peer) if peer == self.peer_id => Err(Error::ArbiterUnreachable(
                "this device's lock table is being handed over to another device; nothing \
                 was granted, try again in a moment"
                    .into(),
            )),
            Some(peer) if self.peers.admitted.contains_key(&peer) => Ok(Some(peer)),
            Some(peer) => Err(Error::ArbiterUnreachable(format!(
                "the lock arbiter (device {peer}) is not connected; nothing was granted"
            ))),
            None => Err(Error::ArbiterUnreachable(
                "this home's lock arbiter is not known on this device yet".into(),
            )),
        }
    }

    /// For an entity another home shares with this one: the owner home's admin device,
    /// which its lock requests (and, with `write` false, reads) go to. `None`: not such
    /// an entity.
    pub(crate) fn shared_in_lock_route(
        &self,
        device: &str,
        write: bool,
    ) -> Option<Result<String, Error>> {
        let shared = self
            .sharing
            .shared_in
            .values()
            .find(|s| s.entity_id == device && !s.revoked)?;
        if write && shared.rights != "write" {
            return Some(Err(Error::Forbidden(format!(
                "{device} is shared with this home read-only; only homes that may write it \
                 may lock it"
            ))));
        }
        Some(
            self.sharing
                .foreign
                .iter()
                .find(|(_, f)| f.home == shared.owner && f.admin)
                .map(|(peer, _)| peer.clone())
                .ok_or_else(|| {
                    Error::ArbiterUnreachable(format!(
                        "{device} belongs to home {}, whose lock arbiter is not connected; \
                         nothing was granted",
                        shared.owner
                    ))
                }),
        )
    }

    /// Sends `message` to `arbiter` and parks `waiting` until it answers.
    pub(crate) fn forward_lock(
        &mut self,
        arbiter: String,
        make: impl FnOnce(u64) -> LockMessage,
        waiting: Waiting,
    ) {
        if self.locks.mirror.forwarded.len() >= MAX_FORWARDS {
            return waiting.fail(Error::ArbiterUnreachable(format!(
                "{MAX_FORWARDS} lock requests are waiting for the arbiter already"
            )));
        }
        if self.locks.mirror.next_id == 0 {
            // A random start, so an answer meant for a request made before a restart
            // cannot match one made after it.
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            self.locks.mirror.next_id = u64::from_le_bytes(seed) >> 1 | 1;
        }
        let id = self.locks.mirror.next_id;
        self.locks.mirror.next_id = id.wrapping_add(1).max(1);
        self.queue_lock_message(&arbiter, &make(id));
        self.locks.mirror.forwarded.insert(
            id,
            Forwarded {
                arbiter,
                deadline_ms: now_ms() + FORWARD_TIMEOUT_MS,
                waiting,
            },
        );
    }

    /// Decodes a lock message, capped; a malformed one is logged and dropped.
    fn decode_lock_message(peer: &str, bytes: &[u8]) -> Option<LockMessage> {
        match crate::trust::wire::from_cbor("lock message", bytes, MAX_SHARE_MESSAGE) {
            Ok(m) => Some(m),
            Err(error) => {
                tracing::warn!(%peer, %error, "malformed lock message dropped");
                None
            }
        }
    }

    /// As the arbiter: decides a request that came in a message, as its answer.
    async fn answer_ask(&mut self, ask: LockAsk) -> Answer {
        match self.decide_lock_or_undo(ask).await {
            Ok(Ok((lock, key))) => Answer::Granted { lock, key },
            Ok(Err((holder, message))) => Answer::Refused { holder, message },
            Err(error) => Answer::failed(error),
        }
    }

    /// As the arbiter: a release that came in a message, as its answer.
    async fn answer_release(&mut self, device: &str, key: &str, user_id: &str) -> Answer {
        match self.decide_release_or_undo(device, key, user_id).await {
            Ok((lock, forced)) => Answer::Released { lock, forced },
            Err(error) => Answer::failed(error),
        }
    }

    /// A lock message from a device of paired home `home`: as the arbiter, it may lock
    /// and release this home's entities shared with that home with write rights; and it
    /// answers requests this device forwarded to it. Nothing else is taken.
    pub(crate) async fn on_foreign_lock_message(&mut self, peer: &str, home: &str, bytes: &[u8]) {
        let Some(message) = Self::decode_lock_message(peer, bytes) else {
            return;
        };
        let may = |core: &Self, device: &str, write: bool| -> Result<(), Error> {
            if !core.is_lock_arbiter() && core.home.root_secret.is_none() {
                return Err(Error::ArbiterUnreachable(
                    "this device is not its home's lock arbiter".into(),
                ));
            }
            let rights = core
                .entities
                .by_id
                .get(device)
                .and_then(|_| {
                    core.engine
                        .registry_entry(core.home.registry_doc, device)
                        .ok()
                        .flatten()
                })
                .filter(|e| e.deleted_at.is_none())
                .and_then(|e| e.shares.get(home).map(|s| s.rights));
            match rights {
                Some(hearth_crdt::schema::registry::Rights::Write) => Ok(()),
                Some(_) if !write => Ok(()),
                Some(_) => Err(Error::Forbidden(format!(
                    "{device} is shared with home {home} read-only"
                ))),
                None => Err(Error::Forbidden(format!(
                    "{device} is not an entity shared with home {home}"
                ))),
            }
        };
        let answer = match message {
            LockMessage::Read { id, .. } => {
                let allowed = may(self, message.device_name(), false);
                if allowed.is_ok() && !self.is_lock_arbiter() {
                    self.relay_lock_message(peer, message);
                    self.send_pending().await;
                    return;
                }
                let answer = match allowed {
                    Ok(()) => self.read_lock(message.device_name()),
                    Err(error) => Answer::failed(error),
                };
                Some((id, answer))
            }
            LockMessage::Ask { id, .. } | LockMessage::Release { id, .. } => {
                let allowed = may(self, message.device_name(), true);
                if allowed.is_ok() && !self.is_lock_arbiter() {
                    // This home's locks are decided by another of its devices: pass the
                    // request on, and its answer back.
                    self.relay_lock_message(peer, message);
                    self.send_pending().await;
                    return;
                }
                let answer = match (allowed, message) {
                    (Err(error), _) => Answer::failed(error),
                    (
                        Ok(()),
                        LockMessage::Release {
                            device_name,
                            key,
                            user_id,
                            ..
                        },
                    ) => self.answer_release(&device_name, &key, &user_id).await,
                    (Ok(()), ask) => match ask.into_ask() {
                        Some(ask) => self.answer_ask(ask).await,
                        None => return,
                    },
                };
                Some((id, answer))
            }
            LockMessage::Answer { id, answer } => {
                self.take_answer(peer, id, answer);
                None
            }
            _ => {
                tracing::warn!(%peer, %home, "lock message a paired home may not send dropped");
                None
            }
        };
        if let Some((id, answer)) = answer {
            self.queue_lock_message(peer, &LockMessage::Answer { id, answer });
        }
        self.send_pending().await;
    }

    /// On the admin device when another device decides: passes a paired home's request
    /// (already allowed) on to the arbiter, to answer `peer` under its own id.
    fn relay_lock_message(&mut self, peer: &str, message: LockMessage) {
        let (their_id, arbiter) = match (&message, self.lock_arbiter_peer()) {
            (
                LockMessage::Ask { id, .. }
                | LockMessage::Release { id, .. }
                | LockMessage::Read { id, .. },
                Some(arbiter),
            ) if self.peers.admitted.contains_key(&arbiter) => (*id, arbiter),
            (
                LockMessage::Ask { id, .. }
                | LockMessage::Release { id, .. }
                | LockMessage::Read { id, .. },
                _,
            ) => {
                let answer = Answer::failed(Error::ArbiterUnreachable(
                    "the owner home's lock arbiter is not connected; nothing was granted".into(),
                ));
                let id = *id;
                return self.queue_lock_message(peer, &LockMessage::Answer { id, answer });
            }
            _ => return,
        };
        let relayed = self
            .locks
            .mirror
            .forwarded
            .values()
            .filter(|f| matches!(&f.waiting, Waiting::Relay { peer: p, .. } if p == peer))
            .count();
        if relayed >= MAX_RELAYS_PER_PEER || self.locks.mirror.forwarded.len() >= MAX_FORWARDS {
            let answer = Answer::failed(Error::ArbiterUnreachable(format!(
                "{relayed} requests of this device are waiting for the lock arbiter already"
            )));
            return self.queue_lock_message(
                peer,
                &LockMessage::Answer {
                    id: their_id,
                    answer,
                },
            );
        }
        let waiting = Waiting::Relay {
            peer: peer.to_string(),
            id: their_id,
        };
        self.forward_lock(
            arbiter,
            move |id| match message {
                LockMessage::Ask {
                    device_name,
                    lock_type,
                    user_id,
                    timeout_s,
                    reason,
                    plan_uid,
                    ..
                } => LockMessage::Ask {
                    id,
                    device_name,
                    lock_type,
                    user_id,
                    timeout_s,
                    reason,
                    plan_uid,
                },
                LockMessage::Release {
                    device_name,
                    key,
                    user_id,
                    ..
                } => LockMessage::Release {
                    id,
                    device_name,
                    key,
                    user_id,
                },
                LockMessage::Read { device_name, .. } => LockMessage::Read { id, device_name },
                other => other,
            },
            waiting,
        );
    }

    /// As the arbiter: the lock on `device`, as a read's answer.
    fn read_lock(&self, device: &str) -> Answer {
        let now = now_ms();
        Answer::Lock {
            lock: self
                .locks
                .arbiter
                .locks()
                .into_iter()
                .find(|l| l.device_name == device && l.expires_at_ms > now),
        }
    }

    /// An answer for a relayed request goes back to the paired home's device.
    fn settle(&mut self, waiting: Waiting, answer: Answer) {
        match waiting {
            Waiting::Relay { peer, id } => {
                self.queue_lock_message(&peer, &LockMessage::Answer { id, answer })
            }
            waiting => waiting.answer(answer),
        }
    }

    /// The answer to request `id`, from the device it was sent to.
    fn take_answer(&mut self, peer: &str, id: u64, answer: Answer) {
        match self.locks.mirror.forwarded.remove(&id) {
            Some(f) if f.arbiter == peer => self.settle(f.waiting, answer),
            Some(f) => {
                // Not the device it was sent to: put it back.
                self.locks.mirror.forwarded.insert(id, f);
            }
            None => {
                // A grant nobody waits for any more (it timed out, or its arbiter was
                // thought gone): give it back, or the lease would stay held with a key
                // nobody has.
                if let Answer::Granted { lock, key } = answer {
                    tracing::info!(%peer, device = %lock.device_name, "releasing a late lock grant");
                    let id = self.locks.mirror.next_id;
                    self.locks.mirror.next_id += 1;
                    self.queue_lock_message(
                        peer,
                        &LockMessage::Release {
                            id,
                            device_name: lock.device_name,
                            key,
                            user_id: lock.user_id,
                        },
                    );
                }
            }
        }
    }

    /// Fails forwarded requests past their time, or all those sent to `gone`.
    pub(crate) fn fail_lock_forwards(&mut self, gone: Option<&str>) {
        let now = now_ms();
        let ids: Vec<u64> = self
            .locks
            .mirror
            .forwarded
            .iter()
            .filter(|(_, f)| f.deadline_ms <= now || gone == Some(f.arbiter.as_str()))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(f) = self.locks.mirror.forwarded.remove(&id) {
                let error = Error::ArbiterUnreachable(format!(
                    "the lock arbiter (device {}) did not answer; the request may not have \
                     reached it, so check `lock status` before asking again",
                    f.arbiter
                ));
                match f.waiting {
                    Waiting::Relay { peer, id } => {
                        let answer = Answer::failed(error);
                        self.queue_lock_message(&peer, &LockMessage::Answer { id, answer });
                    }
                    waiting => waiting.fail(error),
                }
            }
        }
    }

    /// When the first forwarded request runs out of time.
    pub(crate) fn next_forward_deadline(&self) -> Option<u64> {
        self.locks
            .mirror
            .forwarded
            .values()
            .map(|f| f.deadline_ms)
            .min()
    }

    /// As the arbiter: tells every connected device of the home of a change.
    pub(crate) fn announce_lock_change(&mut self, action: LockAction, lock: &LockRecord) {
        let peers: Vec<String> = self.peers.admitted.keys().cloned().collect();
        let message = LockMessage::Changed {
            action,
            lock: lock.clone(),
        };
        for peer in peers {
            self.queue_lock_message(&peer, &message);
        }
    }

    /// As the arbiter: sends a newly admitted device the whole table.
    pub(crate) fn send_lock_table(&mut self, peer: &str) {
        if !self.is_lock_arbiter() {
            return;
        }
        if let Some(named) = &self.locks.naming {
            let message = LockMessage::Naming {
                bytes: ByteBuf::from(named.bytes.clone()),
            };
            self.queue_lock_message(peer, &message);
        }
        let locks = self.locks.arbiter.locks();
        if locks.is_empty() {
            self.queue_lock_message(
                peer,
                &LockMessage::Table {
                    first: true,
                    locks: Vec::new(),
                },
            );
        }
        for (i, chunk) in locks.chunks(TABLE_CHUNK).enumerate() {
            self.queue_lock_message(
                peer,
                &LockMessage::Table {
                    first: i == 0,
                    locks: chunk.to_vec(),
                },
            );
        }
    }

    /// A lock message from a device of this home.
    pub(crate) async fn on_lock_message(&mut self, peer: &str, bytes: &[u8]) {
        let Some(message) = Self::decode_lock_message(peer, bytes) else {
            return;
        };
        let from_arbiter = self.lock_arbiter_peer().as_deref() == Some(peer);
        match message {
            ask @ LockMessage::Ask { id, .. } if self.is_lock_arbiter() => {
                // A name that is another home's shared entity here is that home's to decide.
                let answer = match self.lock_route(ask.device_name()) {
                    Ok(Some(_)) => Answer::failed(Error::Invalid(format!(
                        "{} is an entity another home owns; lock it from a device that holds \
                         its share",
                        ask.device_name()
                    ))),
                    Err(error) => Answer::failed(error),
                    Ok(None) => match ask.into_ask() {
                        Some(ask) => self.answer_ask(ask).await,
                        None => return,
                    },
                };
                self.queue_lock_message(peer, &LockMessage::Answer { id, answer });
            }
            LockMessage::Release {
                id,
                device_name,
                key,
                user_id,
            } if self.is_lock_arbiter() => {
                let answer = self.answer_release(&device_name, &key, &user_id).await;
                self.queue_lock_message(peer, &LockMessage::Answer { id, answer });
            }
            LockMessage::Read { id, device_name } if self.is_lock_arbiter() => {
                let answer = self.read_lock(&device_name);
                self.queue_lock_message(peer, &LockMessage::Answer { id, answer });
            }
            LockMessage::Answer { id, answer } => self.take_answer(peer, id, answer),
            LockMessage::Changed { action, lock } if from_arbiter => {
                match action {
                    LockAction::Acquired => {
                        let table = &mut self.locks.mirror.table;
                        if table.len() < super::arbiter::MAX_LOCKS
                            || table.contains_key(&lock.device_name)
                        {
                            table.insert(lock.device_name.clone(), lock.clone());
                        }
                    }
                    // A preemption's record is the lock that ended; its successor's
                    // `acquired` follows.
                    _ => {
                        if self
                            .locks
                            .mirror
                            .table
                            .get(&lock.device_name)
                            .is_some_and(|held| held.fencing_token <= lock.fencing_token)
                        {
                            self.locks.mirror.table.remove(&lock.device_name);
                        }
                    }
                }
                self.emit_event(super::service::lock_event(action, lock.into()));
            }
            LockMessage::Table { first, locks } if from_arbiter => {
                if first {
                    self.locks.mirror.table.clear();
                }
                for lock in locks.into_iter().take(super::arbiter::MAX_LOCKS) {
                    if self.locks.mirror.table.len() < super::arbiter::MAX_LOCKS {
                        self.locks
                            .mirror
                            .table
                            .insert(lock.device_name.clone(), lock);
                    }
                }
            }
            LockMessage::Ask { id, .. }
            | LockMessage::Release { id, .. }
            | LockMessage::Read { id, .. } => {
                // Sent here as the arbiter, but this device is not (any more): say so at
                // once rather than let the request time out.
                let answer = Answer::failed(Error::ArbiterUnreachable(
                    "the device asked is not the lock arbiter (a handoff may be running); \
                     nothing was granted"
                        .into(),
                ));
                self.queue_lock_message(peer, &LockMessage::Answer { id, answer });
            }
            handoff @ (LockMessage::TableAsk
            | LockMessage::Yield { .. }
            | LockMessage::Resume { .. }
            | LockMessage::Naming { .. }
            | LockMessage::Part { .. }
            | LockMessage::Took { .. }
            | LockMessage::HandoffFailed { .. }) => {
                return self.on_handoff_message(peer, handoff).await;
            }
            _ => tracing::warn!(%peer, "lock message this device does not take dropped"),
        }
        self.send_pending().await;
    }
}
