//! Naming another lock arbiter (`hearth lock arbiter DEVICE`) without ever letting two
//! devices grant the same lock.
//!
//! Which device decides locks is a naming the home's root key signed, written into the
//! home document: the highest `seq` that verifies names the arbiter, and before any
//! naming it is the admin device. A device grants only while it is named *and* holds the
//! table for that naming's `seq` *and* has not yielded it. The admin device (it holds the
//! root key) runs the handoff:
//!
//! 1. It asks the current arbiter to yield (`Yield`): that device stops granting at once,
//!    keeps that in its store, and sends its whole table (leases, keys and the fencing
//!    counter) back in parts under the grant message cap. When the admin is the current
//!    arbiter it yields to itself.
//! 2. It sends the table to the new arbiter, which stores it for the new `seq` and says
//!    so (`Took`). It does not grant yet: nothing names it.
//! 3. Only then does the admin sign the naming and write it into the home document. The
//!    new arbiter starts granting when it reads the naming; every device sends its
//!    requests there from then on.
//!
//! The admin keeps the signed naming in its store before it writes it anywhere else, and
//! passes it to every connected device over the lock channel too (the arbiter also sends
//! it with its table), so a device that edits the home document cannot hide it.
//!
//! If a step does not complete within [`HANDOFF_TIMEOUT_MS`] the admin gives up, never
//! writes the naming, and tells the old arbiter to resume (`Resume`, which gives up only
//! handoffs started before it), so the old arbiter is still the only one that may grant. An old arbiter left yielded (the admin
//! restarted mid-handoff) is told to resume when the admin next sees it with no handoff
//! running. `force` names a device without the old table, for an arbiter that is gone
//! for good: its leases are lost, and the new table's fencing tokens start far above
//! every token this home has seen.

use hearth_storage::{Batch, Keyspace};
use serde::{Deserialize, Serialize};

use super::ArbiterInfo;
use super::arbiter::Arbiter;
use super::forward::LockMessage;
use crate::Error;
use crate::core::effects::Effects;
use crate::core::{Core, Reply, doc_err, now_ms};
use crate::trust::cert::{ArbiterNaming, Verdict};
use hearth_crdt::schema::home as home_schema;

/// How long each step of a handoff may take before the admin gives up.
pub(crate) const HANDOFF_TIMEOUT_MS: u64 = 4_000;
/// Bytes of the table per `Part` message, so one stays under the grant message cap.
pub(crate) const PART_BYTES: usize = 2_800;
/// Most bytes a table in transit may have: a full table of the longest fields, each
/// character escaped, is about 11 MiB of JSON. Tables that large take thousands of parts
/// and may not move within [`HANDOFF_TIMEOUT_MS`]; a handoff that does not is given up.
pub(crate) const MAX_TABLE_BYTES: usize = 12 << 20;
/// How far above every token seen a forced naming starts the fencing counter.
const FORCED_TOKEN_GAP: u64 = 1 << 32;

/// This device's part in the arbiter naming, kept in the store next to the table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Role {
    /// The naming `seq` the stored table is for (0: the admin's table before any naming).
    pub(crate) seq: u64,
    /// Set when this device gave its table away for handoff `seq`: it grants nothing.
    pub(crate) yielded_to: Option<u64>,
}

/// The highest verified naming this device has seen.
#[derive(Clone, Debug)]
pub(crate) struct Named {
    pub(crate) peer: String,
    pub(crate) seq: u64,
    /// The signed naming, passed on to devices over the lock channel.
    pub(crate) bytes: Vec<u8>,
}

/// A handoff the admin device runs.
pub(crate) struct Handoff {
    seq: u64,
    /// The device the table comes from (this device's PeerId when it is the arbiter).
    from: String,
    /// The device being named.
    to: String,
    stage: Stage,
    deadline_ms: u64,
    reply: Reply<ArbiterInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for `from`'s table.
    Collecting,
    /// Waiting for `to` to say it stored the table.
    Placing,
}

/// A table arriving in parts.
#[derive(Default)]
pub(crate) struct Incoming {
    from: String,
    seq: u64,
    total: u32,
    bytes: Vec<u8>,
    next: u32,
}

impl Incoming {
    /// Takes part `index` of `total`; answers the whole table once the last part is in.
    fn take(
        &mut self,
        from: &str,
        seq: u64,
        index: u32,
        total: u32,
        bytes: &[u8],
    ) -> Result<Option<Vec<u8>>, String> {
        if index == 0 {
            if total == 0 || total as usize > MAX_TABLE_BYTES / PART_BYTES + 1 {
                return Err(format!("a table of {total} parts is refused"));
            }
            *self = Incoming {
                from: from.to_string(),
                seq,
                total,
                bytes: Vec::new(),
                next: 0,
            };
        }
        if self.from != from || self.seq != seq || self.total != total || self.next != index {
            return Err(format!(
                "table part {index} of {total} arrived out of order"
            ));
        }
        if bytes.len() > PART_BYTES || self.bytes.len() + bytes.len() > MAX_TABLE_BYTES {
            return Err("table part too large".into());
        }
        self.bytes.extend_from_slice(bytes);
        self.next += 1;
        if self.next == self.total {
            Ok(Some(std::mem::take(&mut self.bytes)))
        } else {
            Ok(None)
        }
    }
}

/// The table as `Part` messages.
fn parts(seq: u64, table: &[u8]) -> Vec<LockMessage> {
    let chunks: Vec<&[u8]> = if table.is_empty() {
        vec![&[][..]]
    } else {
        table.chunks(PART_BYTES).collect()
    };
    let total = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| LockMessage::Part {
            seq,
            index: i as u32,
            total,
            bytes: serde_bytes::ByteBuf::from(c.to_vec()),
        })
        .collect()
}

impl Core {
    /// Whether this device decides locks now.
    pub(crate) fn is_lock_arbiter(&self) -> bool {
        let role = &self.locks.role;
        let named = match &self.locks.naming {
            Some(n) => n.peer == self.peer_id && role.seq == n.seq,
            None => self.home.root_secret.is_some() && role.seq == 0,
        };
        named && role.yielded_to.is_none()
    }

    /// Who decides locks, as this device knows it.
    pub(crate) fn arbiter_info(&self) -> Result<ArbiterInfo, Error> {
        let peer = if self.is_lock_arbiter() {
            Some(self.peer_id.clone())
        } else {
            match &self.locks.naming {
                Some(n) => Some(n.peer.clone()),
                None if self.home.root_secret.is_some() => Some(self.peer_id.clone()),
                None => self.lock_arbiter_peer(),
            }
        };
        let peer = peer.ok_or_else(|| {
            Error::ArbiterUnreachable(
                "this home's lock arbiter is not known on this device yet".into(),
            )
        })?;
        let device_name = self
            .engine
            .home_devices(self.home.home_doc)
            .ok()
            .and_then(|d| d.get(&peer).map(|r| r.name.clone()));
        Ok(ArbiterInfo {
            this_device: peer == self.peer_id,
            peer_id: peer,
            device_name,
            seq: self.locks.naming.as_ref().map_or(0, |n| n.seq),
            granting: self.is_lock_arbiter(),
            handoff_running: self.locks.handoff.is_some(),
        })
    }

    /// The unrevoked device of this home that `device` names (a PeerId or a name).
    fn resolve_home_device(&self, device: &str) -> Result<String, Error> {
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .map_err(doc_err)?;
        // Any device can edit the home document's records: only a name and PeerId that a
        // certificate the root key signed for that very device states count.
        let certified = |peer: &String, r: &hearth_crdt::schema::home::DeviceRecord| {
            if r.revoked_at.is_some() || self.revocations.contains(peer) {
                return None;
            }
            match crate::trust::cert::DeviceCert::verify_bytes(
                &r.certificate,
                &self.home.root_public,
            ) {
                Verdict::Valid(c) if c.peer_id() == peer.as_str() => {
                    Some(c.device_name().to_string())
                }
                _ => None,
            }
        };
        if let Some(r) = devices.get(device) {
            return match certified(&device.to_string(), r) {
                Some(_) => Ok(device.to_string()),
                None => Err(Error::Invalid(format!(
                    "device {device} is revoked or has no valid certificate"
                ))),
            };
        }
        let named: Vec<&String> = devices
            .iter()
            .filter(|(p, r)| certified(p, r).as_deref() == Some(device))
            .map(|(p, _)| p)
            .collect();
        match named.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::NotFound(format!(
                "no device of this home is named {device}"
            ))),
            _ => Err(Error::Invalid(format!(
                "{} devices are named {device}; give the PeerId",
                named.len()
            ))),
        }
    }

    /// Stores the table and this device's role in one batch.
    pub(crate) fn persist_lock_role(&mut self, fx: &mut Effects) {
        let table = crate::records::to_json("lock table", &self.locks.arbiter);
        let role = crate::records::to_json("lock role", &self.locks.role);
        match (table, role) {
            (Ok(table), Ok(role)) => {
                let mut batch = Batch::new();
                batch.put(Keyspace::Meta, crate::records::LOCKS_KEY.to_vec(), table);
                batch.put(Keyspace::Meta, crate::records::LOCK_ROLE_KEY.to_vec(), role);
                fx.persist(batch);
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "cannot encode the lock table")
            }
        }
    }

    /// Starts naming `device` the lock arbiter (on the admin device only).
    pub(crate) async fn start_arbiter_handoff(
        &mut self,
        device: String,
        force: bool,
        reply: Reply<ArbiterInfo>,
    ) {
        if self.home.root_secret.is_none() {
            let _ = reply.send(Err(Error::Forbidden(
                "only the home's admin device can name the lock arbiter (it signs the naming)"
                    .into(),
            )));
            return;
        }
        if self.locks.handoff.is_some() {
            let _ = reply.send(Err(Error::Conflict(
                "a lock arbiter handoff is already running".into(),
            )));
            return;
        }
        let to = match self.resolve_home_device(&device) {
            Ok(to) => to,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let from = self
            .locks
            .naming
            .as_ref()
            .map_or_else(|| self.peer_id.clone(), |n| n.peer.clone());
        let seq = (self.locks.naming.as_ref().map_or(0, |n| n.seq) + 1)
            .max(self.locks.role.seq + 1)
            .max(now_ms());
        if to == from && !force {
            // Already named: make sure it grants (it may have been left yielded by a
            // handoff that never completed; none is running now).
            let result = if to == self.peer_id {
                self.locks.role.yielded_to = None;
                self.step(|core, fx| {
                    core.persist_lock_role(fx);
                    Ok(())
                })
                .await
                .and_then(|()| {
                    if self.is_lock_arbiter() {
                        Ok(())
                    } else {
                        Err(Error::Conflict(
                            "this device is named the lock arbiter but holds no table for the \
                             naming; name it again with --force (its leases are lost)"
                                .into(),
                        ))
                    }
                })
            } else if self.peers.admitted.contains_key(&to) {
                self.queue_lock_message(&to, &LockMessage::Resume { below: seq });
                Ok(())
            } else {
                Err(Error::ArbiterUnreachable(format!(
                    "device {to} is the lock arbiter already but is not connected"
                )))
            };
            self.send_pending().await;
            let _ = reply.send(result.and_then(|()| self.arbiter_info()));
            return;
        }
        self.locks.handoff = Some(Handoff {
            seq,
            from: from.clone(),
            to: to.clone(),
            stage: Stage::Collecting,
            deadline_ms: now_ms() + HANDOFF_TIMEOUT_MS,
            reply,
        });
        if force {
            let floor = self.highest_token_seen().saturating_add(FORCED_TOKEN_GAP);
            tracing::warn!(%to, "naming a lock arbiter without the old arbiter's table");
            self.place_table(Arbiter::starting_after(floor)).await;
        } else if from == self.peer_id {
            self.locks.role.yielded_to = Some(seq);
            let table = self.locks.arbiter.clone();
            let stored = self
                .step(|core, fx| {
                    core.persist_lock_role(fx);
                    Ok(())
                })
                .await;
            match stored {
                Ok(()) => self.place_table(table).await,
                Err(error) => self.abort_handoff(error).await,
            }
        } else if self.peers.admitted.contains_key(&from) {
            self.queue_lock_message(&from, &LockMessage::Yield { seq });
            self.send_pending().await;
        } else {
            self.abort_handoff(Error::ArbiterUnreachable(format!(
                "the lock arbiter (device {from}) is not connected, so its table cannot be \
                 handed over; name a device with --force only if it is gone for good"
            )))
            .await;
        }
    }

    /// The highest fencing token this device knows of.
    fn highest_token_seen(&self) -> u64 {
        let mirror = self.locks.mirror.table.values().map(|l| l.fencing_token);
        mirror
            .max()
            .unwrap_or(0)
            .max(self.locks.arbiter.last_token())
    }

    /// Step 2: the table goes to the device being named (or is installed here).
    async fn place_table(&mut self, table: Arbiter) {
        let Some(h) = self.locks.handoff.as_mut() else {
            return;
        };
        h.stage = Stage::Placing;
        h.deadline_ms = now_ms() + HANDOFF_TIMEOUT_MS;
        let (seq, to) = (h.seq, h.to.clone());
        if to == self.peer_id {
            self.locks.arbiter = table;
            self.locks.role = Role {
                seq,
                yielded_to: None,
            };
            let stored = self
                .step(|core, fx| {
                    core.persist_lock_role(fx);
                    Ok(())
                })
                .await;
            match stored {
                Ok(()) => self.finish_handoff().await,
                Err(error) => self.abort_handoff(error).await,
            }
            return;
        }
        if !self.peers.admitted.contains_key(&to) {
            return self
                .abort_handoff(Error::ArbiterUnreachable(format!(
                    "device {to} is not connected; the arbiter stays where it was"
                )))
                .await;
        }
        match crate::records::to_json("lock table", &table) {
            Ok(bytes) => {
                for part in parts(seq, &bytes) {
                    self.queue_lock_message(&to, &part);
                }
                self.send_pending().await;
            }
            Err(error) => self.abort_handoff(error).await,
        }
    }

    /// Step 3: the new arbiter holds the table; the naming is signed and kept in this
    /// device's store first (so a restart cannot undo it), then written into the home
    /// document and passed on to every connected device.
    async fn finish_handoff(&mut self) {
        let Some(h) = self.locks.handoff.take() else {
            return;
        };
        let signed = self
            .home
            .root_secret
            .map(|s| ed25519_dalek::SigningKey::from_bytes(&s))
            .ok_or_else(|| Error::Internal("the home root key is missing".into()))
            .and_then(|root| {
                ArbiterNaming::issue(&root, &h.to, h.seq, now_ms())
                    .and_then(|n| n.encode())
                    .map_err(|e| Error::Internal(format!("cannot sign the naming: {e}")))
            });
        let signed = match signed {
            Ok(signed) => signed,
            Err(error) => {
                self.locks.handoff = Some(h);
                return self.abort_handoff(error).await;
            }
        };
        let before = (
            self.locks.naming.clone(),
            self.locks.role.clone(),
            self.locks.arbiter.clone(),
        );
        let kept = self
            .step(|core, fx| {
                core.learn_lock_naming(&signed, fx);
                Ok(())
            })
            .await;
        if let Err(error) = kept {
            // Not stored, so never sent: undone, and the old arbiter resumes.
            (self.locks.naming, self.locks.role, self.locks.arbiter) = before;
            self.locks.handoff = Some(h);
            return self.abort_handoff(error).await;
        }
        let written = self
            .step(|core, fx| {
                let (_, out) = core
                    .engine
                    .transact(core.home.home_doc, now_ms(), None, |d, _, _| {
                        home_schema::put_lock_arbiter(d, h.seq, &signed)
                    })
                    .map_err(doc_err)?;
                let batch = core.handle_outputs(out);
                fx.persist(batch);
                fx.audit(
                    &core.peer_id,
                    "lock.arbiter",
                    format!("{} from {} (naming {})", h.to, h.from, h.seq),
                );
                let peers: Vec<String> = core.peers.admitted.keys().cloned().collect();
                let message = LockMessage::Naming {
                    bytes: serde_bytes::ByteBuf::from(signed.clone()),
                };
                for peer in peers {
                    core.queue_lock_message(&peer, &message);
                }
                core.send_queued(fx);
                Ok(())
            })
            .await;
        if let Err(error) = &written {
            // The naming is kept in this device's store and goes to every device over
            // the lock channel; the home document catches up when the store does.
            tracing::warn!(%error, "the lock arbiter naming is not in the home document yet");
        }
        self.send_pending().await;
        let _ = h.reply.send(self.arbiter_info());
    }

    /// Gives a handoff up: the naming is never written, and the old arbiter resumes.
    async fn abort_handoff(&mut self, error: Error) {
        let Some(h) = self.locks.handoff.take() else {
            return;
        };
        tracing::warn!(%error, from = %h.from, to = %h.to, "lock arbiter handoff given up");
        if h.from == self.peer_id {
            self.locks.role.yielded_to = None;
            let _ = self
                .step(|core, fx| {
                    core.persist_lock_role(fx);
                    Ok(())
                })
                .await;
        } else if self.peers.admitted.contains_key(&h.from) {
            self.queue_lock_message(&h.from, &LockMessage::Resume { below: h.seq + 1 });
        }
        self.send_pending().await;
        let _ = h.reply.send(Err(error));
    }

    /// Gives up a handoff past its time, or one whose devices left.
    pub(crate) async fn check_handoff(&mut self, gone: Option<&str>) {
        let Some(h) = &self.locks.handoff else {
            return;
        };
        let waiting_on = match h.stage {
            Stage::Collecting => &h.from,
            Stage::Placing => &h.to,
        };
        if h.deadline_ms <= now_ms() || gone == Some(waiting_on.as_str()) {
            let who = waiting_on.clone();
            self.abort_handoff(Error::ArbiterUnreachable(format!(
                "device {who} did not complete the lock arbiter handoff in time; the arbiter \
                 stays where it was"
            )))
            .await;
        }
    }

    /// When the running handoff times out.
    pub(crate) fn handoff_deadline(&self) -> Option<u64> {
        self.locks.handoff.as_ref().map(|h| h.deadline_ms)
    }

    /// A handoff message from a device of this home.
    pub(crate) async fn on_handoff_message(&mut self, peer: &str, message: LockMessage) {
        let from_admin = self.peers.admin.as_deref() == Some(peer);
        match message {
            LockMessage::Yield { seq } if from_admin => {
                if !(self.is_lock_arbiter() || self.locks.role.yielded_to.is_some()) {
                    let message = "this device is not the lock arbiter".to_string();
                    self.queue_lock_message(peer, &LockMessage::HandoffFailed { seq, message });
                } else {
                    let before = self.locks.role.yielded_to;
                    // Only ever raised: a stale `Yield` cannot undo a later one.
                    self.locks.role.yielded_to = Some(before.map_or(seq, |b| b.max(seq)));
                    let stored = self
                        .step(|core, fx| {
                            core.persist_lock_role(fx);
                            Ok(())
                        })
                        .await;
                    let table = crate::records::to_json("lock table", &self.locks.arbiter);
                    match (stored, table) {
                        (Ok(()), Ok(bytes)) => {
                            tracing::info!(%seq, "yielding the lock table for a handoff");
                            for part in parts(seq, &bytes) {
                                self.queue_lock_message(peer, &part);
                            }
                        }
                        (Err(error), _) | (_, Err(error)) => {
                            self.locks.role.yielded_to = before;
                            let message = error.to_string();
                            self.queue_lock_message(
                                peer,
                                &LockMessage::HandoffFailed { seq, message },
                            );
                        }
                    }
                }
            }
            LockMessage::Resume { below } if from_admin => {
                // Only handoffs started before `below` are given up: a `Resume` overtaken
                // by a later `Yield` leaves that one alone.
                if self.locks.role.yielded_to.is_some_and(|y| y < below) {
                    tracing::info!("the lock arbiter resumes: the handoff was given up");
                    self.locks.role.yielded_to = None;
                    let _ = self
                        .step(|core, fx| {
                            core.persist_lock_role(fx);
                            Ok(())
                        })
                        .await;
                }
            }
            LockMessage::Part {
                seq,
                index,
                total,
                bytes,
            } => {
                self.on_table_part(peer, from_admin, seq, index, total, &bytes)
                    .await
            }
            LockMessage::Took { seq } => {
                let expected = self
                    .locks
                    .handoff
                    .as_ref()
                    .is_some_and(|h| h.seq == seq && h.stage == Stage::Placing && h.to == peer);
                if expected {
                    self.finish_handoff().await;
                }
            }
            LockMessage::HandoffFailed { seq, message } => {
                let ours = self
                    .locks
                    .handoff
                    .as_ref()
                    .is_some_and(|h| h.seq == seq && (h.from == peer || h.to == peer));
                if ours {
                    self.abort_handoff(Error::ArbiterUnreachable(format!(
                        "device {peer} refused the lock arbiter handoff: {message}"
                    )))
                    .await;
                }
            }
            LockMessage::TableAsk if self.is_lock_arbiter() => self.send_lock_table(peer),
            LockMessage::Naming { bytes } => {
                let _ = self
                    .step(|core, fx| {
                        core.learn_lock_naming(&bytes, fx);
                        Ok(())
                    })
                    .await;
            }
            _ => tracing::warn!(%peer, "lock handoff message this device does not take dropped"),
        }
        self.send_pending().await;
    }

    /// A part of a table: the old arbiter's, to the admin running a handoff; or the
    /// admin's, to the device being named.
    async fn on_table_part(
        &mut self,
        peer: &str,
        from_admin: bool,
        seq: u64,
        index: u32,
        total: u32,
        bytes: &[u8],
    ) {
        let collecting = self
            .locks
            .handoff
            .as_ref()
            .is_some_and(|h| h.seq == seq && h.stage == Stage::Collecting && h.from == peer);
        if !collecting && !from_admin {
            tracing::warn!(%peer, "lock table part from a device that may not send one dropped");
            return;
        }
        let newest = self
            .locks
            .role
            .seq
            .max(self.locks.naming.as_ref().map_or(0, |n| n.seq))
            .max(self.locks.role.yielded_to.unwrap_or(0));
        if !collecting && (self.is_lock_arbiter() || seq <= newest) {
            // A table for a handoff older than what this device holds, or one sent to the
            // device that grants now: taking it could move its counter backwards.
            let message = "this device holds a newer lock table".to_string();
            self.queue_lock_message(peer, &LockMessage::HandoffFailed { seq, message });
            return;
        }
        let whole = match self.locks.incoming.take(peer, seq, index, total, bytes) {
            Ok(Some(whole)) => whole,
            Ok(None) => return,
            Err(message) => {
                tracing::warn!(%peer, %message, "lock table transfer refused");
                self.locks.incoming = Incoming::default();
                if collecting {
                    self.abort_handoff(Error::ArbiterUnreachable(message)).await;
                } else {
                    self.queue_lock_message(peer, &LockMessage::HandoffFailed { seq, message });
                }
                return;
            }
        };
        let floor = self.highest_token_seen();
        let table = crate::records::from_json::<Arbiter>("lock table", &whole)
            .map_err(|e| Error::ArbiterUnreachable(format!("the lock table did not decode: {e}")))
            .and_then(|t| {
                t.check(now_ms())
                    .and_then(|()| {
                        if t.last_token() < floor {
                            Err(format!(
                                "its fencing counter {} is below a token already seen ({floor})",
                                t.last_token()
                            ))
                        } else {
                            Ok(())
                        }
                    })
                    .map(|()| t)
                    .map_err(|m| {
                        Error::ArbiterUnreachable(format!("the lock table was refused: {m}"))
                    })
            });
        match (collecting, table) {
            (true, Ok(table)) => self.place_table(table).await,
            (true, Err(error)) => self.abort_handoff(error).await,
            (false, Err(error)) => {
                let message = error.to_string();
                self.queue_lock_message(peer, &LockMessage::HandoffFailed { seq, message });
            }
            (false, Ok(table)) => {
                // Stored for the coming naming; nothing is granted until it is read.
                let before = (self.locks.arbiter.clone(), self.locks.role.clone());
                self.locks.arbiter = table;
                self.locks.role = Role {
                    seq,
                    yielded_to: None,
                };
                let stored = self
                    .step(|core, fx| {
                        core.persist_lock_role(fx);
                        Ok(())
                    })
                    .await;
                match stored {
                    Ok(()) => {
                        tracing::info!(%seq, "took the lock table; waiting for the naming");
                        self.queue_lock_message(peer, &LockMessage::Took { seq });
                    }
                    Err(error) => {
                        (self.locks.arbiter, self.locks.role) = before;
                        let message = error.to_string();
                        self.queue_lock_message(peer, &LockMessage::HandoffFailed { seq, message });
                    }
                }
            }
        }
    }

    /// Learns the naming the home document carries (after it changed, and at start):
    /// the highest one that verifies under the home's root key is kept. A device that
    /// becomes the arbiter sends every connected device its table; one that learns of a
    /// new arbiter asks it for its table.
    pub(crate) fn absorb_lock_naming(&mut self, fx: &mut Effects) {
        let bytes = match self
            .engine
            .doc(self.home.home_doc)
            .map_err(|e| e.to_string())
            .and_then(|d| home_schema::lock_arbiters(d).map_err(|e| e.to_string()))
        {
            Ok(all) => all,
            Err(error) => {
                tracing::debug!(%error, "home document lock arbiters not readable");
                return;
            }
        };
        for naming in bytes {
            self.learn_lock_naming(&naming, fx);
        }
    }

    /// Takes a signed naming if it verifies and is newer than the one known.
    pub(crate) fn learn_lock_naming(&mut self, bytes: &[u8], fx: &mut Effects) {
        let naming = match ArbiterNaming::verify_bytes(bytes, &self.home.root_public) {
            Verdict::Valid(n) => n,
            other => {
                tracing::warn!(verdict = ?other, "ignoring a lock arbiter naming that does not verify");
                return;
            }
        };
        if self
            .locks
            .naming
            .as_ref()
            .is_some_and(|n| n.seq >= naming.seq())
        {
            return;
        }
        let was = self.is_lock_arbiter();
        self.locks.naming = Some(Named {
            peer: naming.peer_id().to_string(),
            seq: naming.seq(),
            bytes: bytes.to_vec(),
        });
        let mut batch = Batch::new();
        batch.put(
            Keyspace::Meta,
            crate::records::LOCK_NAMING_KEY.to_vec(),
            bytes.to_vec(),
        );
        fx.persist(batch);
        let now = self.is_lock_arbiter();
        tracing::info!(arbiter = %naming.peer_id(), seq = naming.seq(), this_device = now, "lock arbiter named");
        if now && !was {
            let peers: Vec<String> = self.peers.admitted.keys().cloned().collect();
            for peer in peers {
                self.send_lock_table(&peer);
            }
        } else if !now && naming.peer_id() != self.peer_id {
            if self
                .locks
                .role
                .yielded_to
                .is_some_and(|seq| seq <= naming.seq())
            {
                // The handoff this device yielded its table to is done: the table is
                // the new arbiter's now.
                self.locks.arbiter = Arbiter::default();
                self.locks.role = Role::default();
                self.persist_lock_role(fx);
            }
            self.locks.mirror.table.clear();
            if self.peers.admitted.contains_key(naming.peer_id()) {
                self.queue_lock_message(naming.peer_id(), &LockMessage::TableAsk);
            }
        }
    }

    /// Reads the stored naming and role at start (the table is read by `load_locks`).
    pub(crate) async fn load_lock_role(&mut self) {
        for key in [
            crate::records::LOCK_ROLE_KEY,
            crate::records::LOCK_NAMING_KEY,
        ] {
            match self.store.get(Keyspace::Meta, key.to_vec()).await {
                Ok(Some(bytes)) if key == crate::records::LOCK_ROLE_KEY => {
                    match crate::records::from_json("lock role", &bytes) {
                        Ok(role) => self.locks.role = role,
                        Err(error) => tracing::error!(%error, "the stored lock role is unreadable"),
                    }
                }
                Ok(Some(bytes)) => {
                    if let Verdict::Valid(n) =
                        ArbiterNaming::verify_bytes(&bytes, &self.home.root_public)
                    {
                        self.locks.naming = Some(Named {
                            peer: n.peer_id().to_string(),
                            seq: n.seq(),
                            bytes,
                        });
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::error!(%error, "cannot read the lock role"),
            }
        }
        // A handoff this admin device ran before a restart cannot complete any more (it
        // was in memory), so a table it yielded to it is its own again.
        if self.home.root_secret.is_some() && self.locks.role.yielded_to.is_some() {
            tracing::info!(
                "resuming as the lock arbiter: a handoff did not complete before the restart"
            );
            self.locks.role.yielded_to = None;
        }
    }

    /// On the admin, when a device of the home is admitted: the named arbiter, left
    /// yielded by a handoff that never completed, is told to resume.
    pub(crate) fn resume_stale_arbiter(&mut self, peer: &str) {
        if self.home.root_secret.is_none() || self.locks.handoff.is_some() {
            return;
        }
        if self.locks.naming.as_ref().is_some_and(|n| n.peer == peer) {
            // Every handoff this device started is over, so any yield before now is stale.
            let below = now_ms();
            self.queue_lock_message(peer, &LockMessage::Resume { below });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::TestCore;
    use crate::locks::service::LockRequest;
    use crate::locks::{LockAsk, LockOutcome, LockType};

    async fn grant(t: &TestCore, device: &str) -> u64 {
        let ask = LockAsk::new(device, LockType::QueueExecuting, "q");
        match t
            .core
            .call(|reply| LockRequest::Request { ask, reply })
            .await
            .unwrap()
            .unwrap()
        {
            LockOutcome::Granted { lock, .. } => lock.fencing_token,
            other => panic!("{other:?}"),
        }
    }

    async fn name(t: &TestCore, device: &str, force: bool) -> Result<ArbiterInfo, Error> {
        let device = device.to_string();
        t.core
            .call(|reply| LockRequest::NameArbiter {
                device,
                force,
                reply,
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_admin_names_itself_and_a_forced_naming_starts_a_fresh_table_above_every_token() {
        let t = TestCore::start("admin").await;
        assert_eq!(grant(&t, "pump").await, 1);
        let info = t
            .core
            .call(|reply| LockRequest::Arbiter { reply })
            .await
            .unwrap()
            .unwrap();
        assert!(
            info.this_device && info.granting && info.seq == 0,
            "{info:?}"
        );
        assert!(matches!(
            name(&t, "nobody", false).await,
            Err(Error::NotFound(_))
        ));
        // Naming the arbiter it already is changes nothing.
        let same = name(&t, "admin", false).await.unwrap();
        assert_eq!((same.seq, same.granting), (0, true));
        assert_eq!(grant(&t, "valve").await, 2);
        // Forced: a new naming, the old leases gone, tokens far above the old ones.
        let forced = name(&t, &t.peer_id, true).await.unwrap();
        assert!(
            forced.seq > 0 && forced.granting && forced.this_device,
            "{forced:?}"
        );
        let status = t
            .core
            .call(|reply| LockRequest::Status { reply })
            .await
            .unwrap()
            .unwrap();
        assert!(status.is_empty(), "{status:?}");
        assert!(grant(&t, "pump").await > FORCED_TOKEN_GAP);
        t.stop().await;
    }

    #[test]
    fn a_table_in_parts_comes_back_whole_and_order_is_enforced() {
        let table: Vec<u8> = (0..(PART_BYTES * 2 + 5)).map(|i| i as u8).collect();
        let msgs = parts(9, &table);
        assert_eq!(msgs.len(), 3);
        let mut incoming = Incoming::default();
        let mut whole = None;
        for m in &msgs {
            let LockMessage::Part {
                seq,
                index,
                total,
                bytes,
            } = m
            else {
                unreachable!()
            };
            whole = incoming.take("a", *seq, *index, *total, bytes).unwrap();
        }
        assert_eq!(whole, Some(table.clone()));
        // Out of order, from another device midway, or too many parts: refused.
        let mut incoming = Incoming::default();
        let LockMessage::Part { bytes, .. } = &msgs[1] else {
            unreachable!()
        };
        assert!(incoming.take("a", 9, 1, 3, bytes).is_err());
        incoming.take("a", 9, 0, 3, bytes).unwrap();
        assert!(incoming.take("b", 9, 1, 3, bytes).is_err());
        assert!(
            Incoming::default()
                .take("a", 9, 0, u32::MAX, bytes)
                .is_err()
        );
        // An empty table is one empty part.
        let empty = parts(1, &[]);
        assert_eq!(empty.len(), 1);
    }
}
