//! The sessions service on the core: starting a session (a document of the home), reading
//! it, and the handoff protocol. Each step decides synchronously and records its effects
//! (store the document change, emit the event, send the message) through
//! [`Core::step`]; the caller of a handoff is answered once the target accepted or the
//! timeout rolled it back.

use std::collections::BTreeMap;

use hearth_crdt::schema::session::HandoffOutcome;
use hearth_crdt::{DocId, DocKind};
use hearth_storage::Batch;
use serde_json::{Map, Value, json};

use super::wire::SessionMessage;
use super::{
    HANDOFF_TIMEOUT, Handoff, HandoffReport, MAX_PENDING_HANDOFFS, MAX_SESSION_CONTEXT,
    MAX_SESSIONS, NewSession, Session,
};
use crate::Error;
use crate::core::effects::Effects;
use crate::core::{Core, Reply, doc_err, now_ms, rfc3339_ms};
use crate::events::Event;
use crate::propagation::limit::{RateLimit, Verdict};
use crate::trust::messages::ShareMessage;

/// How long a target waits for the source's acknowledgement after accepting: longer
/// than the source's own timeout, so the source has decided by then.
const TARGET_WAIT_MS: u64 = 2 * HANDOFF_TIMEOUT.as_millis() as u64;

/// Requests of the sessions service.
pub(crate) enum SessionRequest {
    Start {
        new: NewSession,
        reply: Reply<Session>,
    },
    Get {
        id: String,
        reply: Reply<Session>,
    },
    List {
        reply: Reply<Vec<Session>>,
    },
    SetContext {
        id: String,
        context: Map<String, Value>,
        reply: Reply<Session>,
    },
    Handoff {
        id: String,
        to: String,
        reply: Reply<HandoffReport>,
    },
}

impl SessionRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        !matches!(self, Self::Get { .. } | Self::List { .. })
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::Start { reply, .. }
            | Self::Get { reply, .. }
            | Self::SetContext { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::List { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Handoff { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A handoff this device prepared as the source, waiting for the target.
struct Outgoing {
    session: DocId,
    target: String,
    deadline_ms: u64,
    reply: Reply<HandoffReport>,
}

/// A handoff this device accepted as the target, waiting for the acknowledgement.
struct Incoming {
    session: String,
    source: String,
    deadline_ms: u64,
    /// What the target's events say about it: user, persona, context, devices.
    data: Value,
}

/// The service's state: handoffs in progress, and the rate limit on peers' messages.
#[derive(Default)]
pub(crate) struct SessionState {
    outgoing: BTreeMap<String, Outgoing>,
    incoming: BTreeMap<String, Incoming>,
    limit: RateLimit,
}

impl SessionState {
    /// When a handoff in progress next times out, if one is.
    pub(crate) fn deadline(&self) -> Option<u64> {
        let out = self.outgoing.values().map(|o| o.deadline_ms);
        let inc = self.incoming.values().map(|i| i.deadline_ms);
        out.chain(inc).min()
    }
}

fn session_err(e: hearth_crdt::Error) -> Error {
    match e {
        hearth_crdt::Error::Schema { .. } => Error::Invalid(e.to_string()),
        hearth_crdt::Error::Refused { .. } => Error::Conflict(e.to_string()),
        other => doc_err(other),
    }
}

/// Checks a user or persona name: what the document accepts.
pub(crate) fn check_label(what: &str, text: &str) -> Result<(), Error> {
    if text.trim().is_empty()
        || text.len() > hearth_crdt::schema::MAX_NAME_BYTES
        || text.chars().any(char::is_control)
    {
        return Err(Error::Invalid(format!(
            "{what} must be 1 to {} bytes of printable text",
            hearth_crdt::schema::MAX_NAME_BYTES
        )));
    }
    Ok(())
}

fn check_context(context: &Map<String, Value>) -> Result<(), Error> {
    let len = serde_json::to_string(context).map_or(usize::MAX, |t| t.len());
    if len > MAX_SESSION_CONTEXT {
        return Err(Error::Invalid(format!(
            "context is {len} bytes as JSON; at most {MAX_SESSION_CONTEXT} are allowed"
        )));
    }
    Ok(())
}

/// A fresh handoff id.
fn new_handoff_id() -> Result<String, Error> {
    let bytes: [u8; 8] = crate::home::random()?;
    Ok(bs58::encode(bytes).into_string())
}

impl Core {
    /// Answers a request of the service.
    pub(crate) async fn handle_sessions(&mut self, request: SessionRequest) {
        match request {
            SessionRequest::Start { new, reply } => {
                let result = self.start_session(new);
                self.reply_after_flush(result, reply);
            }
            SessionRequest::Get { id, reply } => {
                let _ = reply.send(self.session_doc(&id).and_then(|d| self.session_view(d)));
            }
            SessionRequest::List { reply } => {
                let list = self
                    .session_docs()
                    .into_iter()
                    .filter_map(|d| self.session_view(d).ok())
                    .collect();
                let _ = reply.send(Ok(list));
            }
            SessionRequest::SetContext { id, context, reply } => {
                let result = self.set_session_context(&id, &context);
                self.reply_after_flush(result, reply);
            }
            SessionRequest::Handoff { id, to, reply } => {
                let prepared = self
                    .step(|core, fx| core.prepare_handoff(&id, &to, fx))
                    .await;
                match prepared {
                    Ok((handoff, session, target)) => {
                        self.sessions.outgoing.insert(
                            handoff,
                            Outgoing {
                                session,
                                target,
                                deadline_ms: now_ms() + HANDOFF_TIMEOUT.as_millis() as u64,
                                reply,
                            },
                        );
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
        }
    }

    /// Session documents of this home whose content is here.
    pub(crate) fn session_docs(&self) -> Vec<DocId> {
        self.engine
            .documents()
            .filter(|d| {
                self.engine
                    .header(*d)
                    .is_ok_and(|h| h.kind == DocKind::Session && h.owner_home == self.home.home_id)
            })
            .collect()
    }

    /// The session document `id` names.
    fn session_doc(&self, id: &str) -> Result<DocId, Error> {
        DocId::parse(id)
            .filter(|d| {
                self.engine
                    .header(*d)
                    .is_ok_and(|h| h.kind == DocKind::Session && h.owner_home == self.home.home_id)
            })
            .ok_or_else(|| Error::NotFound(format!("no session {id:?} on this device")))
    }

    /// A device's name as the home document records it.
    pub(crate) fn device_name_of(&self, peer: &str) -> Option<String> {
        self.engine
            .home_devices(self.home.home_doc)
            .ok()
            .and_then(|devices| devices.get(peer).map(|d| d.name.clone()))
    }

    /// The unrevoked device of this home that `device` names (a PeerId, or a name only
    /// one device has), as its certificate, signed by the home's root key, states it.
    pub(crate) fn resolve_home_device_named(&self, device: &str) -> Result<String, Error> {
        use crate::trust::cert::{DeviceCert, Verdict};
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .map_err(doc_err)?;
        // Any device can edit the home document's records: only what a certificate says
        // of that very device counts.
        let certified = |peer: &String, r: &hearth_crdt::schema::home::DeviceRecord| {
            if r.revoked_at.is_some() || self.revocations.contains(peer) {
                return None;
            }
            match DeviceCert::verify_bytes(&r.certificate, &self.home.root_public) {
                Verdict::Valid(c) if c.peer_id() == peer.as_str() => {
                    Some(c.device_name().to_string())
                }
                _ => None,
            }
        };
        let found: Vec<&String> = devices
            .iter()
            .filter_map(|(p, r)| {
                let name = certified(p, r)?;
                (p == device || name == device).then_some(p)
            })
            .collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::NotFound(format!(
                "no device {device:?} in this home; name a device by its PeerId or its name \
                 (see `hearth status`)"
            ))),
            _ => Err(Error::Conflict(format!(
                "more than one device is named {device:?}; use its PeerId"
            ))),
        }
    }

    fn session_view(&self, doc: DocId) -> Result<Session, Error> {
        let s = self.engine.session(doc).map_err(session_err)?;
        let handoffs = s
            .handoffs
            .iter()
            .map(|h| Handoff {
                id: h.id.clone(),
                from: h.from.as_str().into(),
                to: h.to.as_str().into(),
                to_device: self.device_name_of(&h.to),
                started_at: rfc3339_ms(h.started_at_ms),
                finished_at: h.finished_at_ms.map(rfc3339_ms),
                outcome: h.outcome.as_str().into(),
            })
            .collect();
        Ok(Session {
            id: doc.to_string(),
            user: s.user,
            device: self.device_name_of(&s.active_device),
            device_id: s.active_device.into(),
            persona: s.persona,
            context: s.context,
            context_at: rfc3339_ms(s.context_at_ms),
            handoffs,
        })
    }

    fn start_session(&mut self, new: NewSession) -> Result<(Session, Batch), Error> {
        check_label("user", &new.user)?;
        if let Some(p) = &new.persona {
            check_label("persona", p)?;
        }
        check_context(&new.context)?;
        let held = self.session_docs().len();
        if held >= MAX_SESSIONS {
            return Err(Error::Conflict(format!(
                "this home has {held} sessions, the most it keeps ({MAX_SESSIONS})"
            )));
        }
        let doc = DocId::from_bytes(crate::home::random()?);
        let now = now_ms();
        let me = self.peer_id.clone();
        let (doc, batch) = self.create_shared_doc(doc, now, None, |engine, doc, epoch, home| {
            engine
                .create_session_with(
                    doc,
                    &home.home_id,
                    epoch,
                    &new.user,
                    new.persona.as_deref(),
                    &me,
                    &new.context,
                    now,
                )
                .map_err(session_err)
        })?;
        Ok((self.session_view(doc)?, batch))
    }

    fn set_session_context(
        &mut self,
        id: &str,
        context: &Map<String, Value>,
    ) -> Result<(Session, Batch), Error> {
        check_context(context)?;
        let doc = self.session_doc(id)?;
        let s = self.engine.session(doc).map_err(session_err)?;
        self.check_here(id, &s)?;
        if let Some(h) = s.pending_handoff() {
            return Err(Error::Conflict(format!(
                "session {id} is being handed to {}; save its context once that is done",
                h.to
            )));
        }
        let out = self
            .engine
            .set_session_context(doc, context, now_ms(), None)
            .map_err(session_err)?;
        let batch = self.handle_outputs(out);
        Ok((self.session_view(doc)?, batch))
    }

    /// Refuses a change of a session active on another device.
    fn check_here(&self, id: &str, s: &hearth_crdt::Session) -> Result<(), Error> {
        if s.active_device == self.peer_id {
            return Ok(());
        }
        let name = self
            .device_name_of(&s.active_device)
            .unwrap_or_else(|| s.active_device.clone());
        Err(Error::Conflict(format!(
            "session {id} is active on {name}, not on this device; ask that device"
        )))
    }

    /// Prepares a handoff on this device, the source: records it pending in the
    /// document, announces it, and offers the session with its context to the target.
    /// Returns the handoff's id, the session and the target's PeerId.
    fn prepare_handoff(
        &mut self,
        id: &str,
        to: &str,
        fx: &mut Effects,
    ) -> Result<(String, DocId, String), Error> {
        let doc = self.session_doc(id)?;
        let s = self.engine.session(doc).map_err(session_err)?;
        self.check_here(id, &s)?;
        let target = self.resolve_home_device_named(to)?;
        if target == self.peer_id {
            return Err(Error::Conflict(format!(
                "session {id} is already active on this device"
            )));
        }
        if self.sessions.outgoing.values().any(|o| o.session == doc) {
            return Err(Error::Conflict(format!(
                "session {id} is being handed over already; wait for that to finish"
            )));
        }
        if self.sessions.outgoing.len() >= MAX_PENDING_HANDOFFS {
            return Err(Error::Conflict(format!(
                "{MAX_PENDING_HANDOFFS} handoffs are under way on this device; retry shortly"
            )));
        }
        let now = now_ms();
        let mut out = Vec::new();
        // A handoff left pending by a restart has no one waiting for it: it rolled back.
        if let Some(stale) = s.pending_handoff() {
            let (_, o) = self
                .engine
                .finish_handoff(doc, &stale.id, HandoffOutcome::RolledBack, now, None)
                .map_err(session_err)?;
            out.extend(o);
        }
        let handoff = new_handoff_id()?;
        out.extend(
            self.engine
                .begin_handoff(doc, &handoff, &target, now, None)
                .map_err(session_err)?,
        );
        let batch = self.handle_outputs(out);
        fx.persist(batch);
        let session = self.session_view(doc)?;
        let view = session.handoffs.last().cloned();
        if let Some(h) = &view {
            fx.emit(self.handoff_event("started", &session, h, None, None));
        }
        let context = serde_json::to_string(&session.context)
            .map_err(|e| Error::Internal(format!("context does not encode: {e}")))?;
        self.send_session_message(
            &target,
            &SessionMessage::Offer {
                session: id.to_string(),
                handoff: handoff.clone(),
                user: session.user.clone(),
                persona: session.persona.clone(),
                context,
            },
        );
        if !self.peers.admitted.contains_key(&target) {
            tracing::info!(%target, session = %id, "handoff target not connected; it rolls back unless it accepts in time");
        }
        self.send_queued(fx);
        Ok((handoff, doc, target))
    }

    /// Queues a message to a connected device of this home; one that is not connected
    /// does not get it (the timeout decides then).
    fn send_session_message(&mut self, peer: &str, message: &SessionMessage) {
        if !self.peers.admitted.contains_key(peer) {
            return;
        }
        match message.encode() {
            Ok(bytes) => self.queue_share_message(
                peer,
                &ShareMessage::Session {
                    bytes: serde_bytes::ByteBuf::from(bytes),
                },
            ),
            Err(error) => tracing::warn!(%error, "cannot encode a session message"),
        }
    }

    /// The `session.handoff` event for one step, told from the source's side.
    fn handoff_event(
        &self,
        phase: &str,
        session: &Session,
        h: &Handoff,
        reason: Option<&str>,
        from_peer: Option<&str>,
    ) -> Event {
        let data = json!({
            "phase": phase,
            "role": "source",
            "session_id": session.id,
            "handoff_id": h.id,
            "user": session.user,
            "persona": session.persona,
            "from": h.from,
            "from_device": self.device_name_of(h.from.as_str()),
            "to": h.to,
            "to_device": h.to_device,
            "device": session.device,
            "device_id": session.device_id,
            "context": session.context,
            "reason": reason,
        });
        Event::Coordination {
            name: "session.handoff",
            subject: session.id.clone(),
            data,
            from_peer: from_peer.map(Into::into),
        }
    }

    /// Finishes a handoff this device prepared, with `outcome`, and answers its caller.
    async fn finish_outgoing(
        &mut self,
        handoff: String,
        o: Outgoing,
        outcome: HandoffOutcome,
        reason: Option<String>,
    ) {
        let result = self
            .step(|core, fx| {
                let (_, out) = core
                    .engine
                    .finish_handoff(o.session, &handoff, outcome, now_ms(), None)
                    .map_err(session_err)?;
                let batch = core.handle_outputs(out);
                fx.persist(batch);
                let session = core.session_view(o.session)?;
                let h = session
                    .handoffs
                    .iter()
                    .rev()
                    .find(|h| h.id == handoff)
                    .cloned()
                    .ok_or_else(|| Error::Internal("the handoff left the history".into()))?;
                let phase = outcome.as_str();
                fx.emit(core.handoff_event(phase, &session, &h, reason.as_deref(), None));
                let message = match outcome {
                    HandoffOutcome::Completed => SessionMessage::Commit {
                        session: session.id.clone(),
                        handoff: handoff.clone(),
                    },
                    _ => SessionMessage::Abort {
                        session: session.id.clone(),
                        handoff: handoff.clone(),
                    },
                };
                // After the document change, on the same stream: the target holds the
                // session's new state by the time it reads the acknowledgement.
                core.send_session_message(&o.target, &message);
                core.send_queued(fx);
                Ok(HandoffReport {
                    session,
                    handoff: h,
                    reason,
                })
            })
            .await;
        let _ = o.reply.send(result);
    }

    /// Handoffs past their time: a source rolls back; a target that heard no
    /// acknowledgement reads the outcome from the document (which the source writes),
    /// and otherwise counts it rolled back.
    pub(crate) async fn session_tick(&mut self) {
        let now = now_ms();
        let late: Vec<String> = self
            .sessions
            .outgoing
            .iter()
            .filter(|(_, o)| o.deadline_ms <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for handoff in late {
            if let Some(o) = self.sessions.outgoing.remove(&handoff) {
                tracing::info!(%handoff, target = %o.target, "handoff timed out; rolling back");
                self.finish_outgoing(
                    handoff,
                    o,
                    HandoffOutcome::RolledBack,
                    Some("timeout".into()),
                )
                .await;
            }
        }
        let late: Vec<String> = self
            .sessions
            .incoming
            .iter()
            .filter(|(_, i)| i.deadline_ms <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for handoff in late {
            if let Some(i) = self.sessions.incoming.remove(&handoff) {
                let completed = DocId::parse(&i.session)
                    .and_then(|d| self.engine.session(d).ok())
                    .is_some_and(|s| {
                        s.handoffs
                            .iter()
                            .any(|h| h.id == handoff && h.outcome == HandoffOutcome::Completed)
                    });
                let (phase, reason) = if completed {
                    ("completed", None)
                } else {
                    ("rolled_back", Some("no acknowledgement from the source"))
                };
                self.emit_incoming(&handoff, &i, phase, reason);
            }
        }
    }

    fn emit_incoming(&self, handoff: &str, i: &Incoming, phase: &str, reason: Option<&str>) {
        let mut data = i.data.clone();
        data["phase"] = json!(phase);
        data["reason"] = json!(reason);
        if phase == "completed" {
            data["device_id"] = json!(self.peer_id);
            data["device"] = json!(self.device_name);
        }
        tracing::debug!(%handoff, phase, "handoff step on the target");
        self.emit_event(Event::Coordination {
            name: "session.handoff",
            subject: i.session.clone(),
            data,
            from_peer: Some(i.source.as_str().into()),
        });
    }

    /// A handoff message from an admitted device of this home: rate first, then shape,
    /// then whether that device is the one the handoff names. Dropped messages are logged.
    pub(crate) async fn on_session_message(&mut self, peer: &str, bytes: &[u8]) {
        if let Verdict::Drop { log } = self.sessions.limit.check(peer, now_ms()) {
            if log.is_some() {
                tracing::warn!(%peer, "a device sends handoff messages faster than allowed");
            }
            return;
        }
        let (message, context) = match SessionMessage::decode(bytes) {
            Ok(m) => m,
            Err(reason) => {
                tracing::warn!(%peer, %reason, len = bytes.len(), "handoff message dropped");
                return;
            }
        };
        match message {
            SessionMessage::Offer {
                session,
                handoff,
                user,
                persona,
                ..
            } => {
                let context = context.unwrap_or_default();
                self.on_offer(peer, session, handoff, user, persona, context)
                    .await
            }
            SessionMessage::Accept { session, handoff } => {
                self.on_answer(peer, &session, handoff, None).await
            }
            SessionMessage::Refuse {
                session,
                handoff,
                reason,
            } => self.on_answer(peer, &session, handoff, Some(reason)).await,
            SessionMessage::Commit { session, handoff } => {
                self.on_acknowledgement(peer, &session, &handoff, true)
            }
            SessionMessage::Abort { session, handoff } => {
                self.on_acknowledgement(peer, &session, &handoff, false)
            }
        }
    }

    /// The source's last word on a handoff this device accepted: only that source may
    /// give it.
    fn on_acknowledgement(&mut self, peer: &str, session: &str, handoff: &str, committed: bool) {
        match self.sessions.incoming.get(handoff) {
            Some(i) if i.source == peer && i.session == session => {
                if let Some(i) = self.sessions.incoming.remove(handoff) {
                    let phase = if committed {
                        "completed"
                    } else {
                        "rolled_back"
                    };
                    let reason = (!committed).then_some("the source rolled back");
                    self.emit_incoming(handoff, &i, phase, reason);
                }
            }
            _ => tracing::warn!(
                %peer,
                %handoff,
                "acknowledgement for no handoff accepted here, or from another device; dropped"
            ),
        }
    }

    /// An offer to this device: accepted unless too many are in progress, or the session
    /// (when its document is here) is not active on the device that offers it.
    async fn on_offer(
        &mut self,
        peer: &str,
        session: String,
        handoff: String,
        user: String,
        persona: Option<String>,
        context: Map<String, Value>,
    ) {
        let refuse = |reason: &str| SessionMessage::Refuse {
            session: session.clone(),
            handoff: handoff.clone(),
            reason: reason.into(),
        };
        let doc = DocId::parse(&session);
        let owner = doc.and_then(|d| {
            self.engine
                .header(d)
                .ok()
                .map(|h| (h.kind, h.owner_home.clone()))
        });
        let held = doc.and_then(|d| self.engine.session(d).ok());
        let verdict = if doc.is_none() {
            Err("not a session id")
        } else if owner.is_some_and(|(k, home)| k != DocKind::Session || home != self.home.home_id)
        {
            Err("not a session of this home")
        } else if held.as_ref().is_some_and(|s| s.active_device != peer) {
            Err("the session is not active on the device that offers it")
        } else if !self.sessions.incoming.contains_key(&handoff)
            && self.sessions.incoming.len() >= MAX_PENDING_HANDOFFS
        {
            Err("this device has too many handoffs under way")
        } else {
            Ok(())
        };
        let _ = self
            .step(|core, fx| {
                if let Err(reason) = verdict {
                    tracing::warn!(%peer, %session, reason, "handoff offer refused");
                    core.send_session_message(peer, &refuse(reason));
                    core.send_queued(fx);
                    return Ok(());
                }
                if !core.sessions.incoming.contains_key(&handoff) {
                    let data = json!({
                        "phase": "started",
                        "role": "target",
                        "session_id": session,
                        "handoff_id": handoff,
                        "user": user,
                        "persona": persona,
                        "from": peer,
                        "from_device": core.device_name_of(peer),
                        "to": core.peer_id,
                        "to_device": core.device_name,
                        "device": core.device_name_of(peer),
                        "device_id": peer,
                        "context": context,
                        "reason": null,
                    });
                    fx.emit(Event::Coordination {
                        name: "session.handoff",
                        subject: session.clone(),
                        data: data.clone(),
                        from_peer: Some(peer.into()),
                    });
                    core.sessions.incoming.insert(
                        handoff.clone(),
                        Incoming {
                            session: session.clone(),
                            source: peer.to_string(),
                            deadline_ms: now_ms() + TARGET_WAIT_MS,
                            data,
                        },
                    );
                }
                // A repeated offer is answered again, and announced once.
                core.send_session_message(
                    peer,
                    &SessionMessage::Accept {
                        session: session.clone(),
                        handoff: handoff.clone(),
                    },
                );
                core.send_queued(fx);
                Ok(())
            })
            .await;
    }

    /// The target's answer to a handoff this device prepared; only the target may answer.
    async fn on_answer(
        &mut self,
        peer: &str,
        session: &str,
        handoff: String,
        refused: Option<String>,
    ) {
        let Some(o) = self.sessions.outgoing.get(&handoff) else {
            // Too late: it rolled back already. Tell the target, so it does not wait.
            tracing::info!(%peer, %handoff, "answer to a handoff no longer under way");
            if refused.is_none() {
                let _ = self
                    .step(|core, fx| {
                        core.send_session_message(
                            peer,
                            &SessionMessage::Abort {
                                session: session.to_string(),
                                handoff: handoff.clone(),
                            },
                        );
                        core.send_queued(fx);
                        Ok(())
                    })
                    .await;
            }
            return;
        };
        if o.target != peer || o.session.to_string() != session {
            tracing::warn!(%peer, %handoff, "answer from a device the handoff does not name; dropped");
            return;
        }
        let Some(o) = self.sessions.outgoing.remove(&handoff) else {
            return;
        };
        match refused {
            None => {
                self.finish_outgoing(handoff, o, HandoffOutcome::Completed, None)
                    .await
            }
            Some(reason) => {
                let reason = format!("refused by the target: {reason}");
                self.finish_outgoing(handoff, o, HandoffOutcome::RolledBack, Some(reason))
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::TestCore;

    async fn call<T>(
        t: &TestCore,
        make: impl FnOnce(Reply<T>) -> SessionRequest,
    ) -> Result<T, Error> {
        t.core.call(make).await.unwrap()
    }

    fn ctx(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[tokio::test]
    async fn a_session_starts_here_and_reads_back_with_its_device_and_context() {
        let t = TestCore::start("kitchen").await;
        let new = NewSession {
            user: "ann".into(),
            persona: Some("chef".into()),
            context: ctx(json!({"recipe": "soup", "step": 3})),
        };
        let s = call(&t, |reply| SessionRequest::Start { new, reply })
            .await
            .unwrap();
        assert_eq!(s.user, "ann");
        assert_eq!(s.device.as_deref(), Some("kitchen"));
        assert_eq!(s.device_id, t.peer_id.as_str());
        assert_eq!(s.persona.as_deref(), Some("chef"));
        assert_eq!(s.context["recipe"], "soup");
        let id = s.id.clone();
        let got = call(&t, |reply| SessionRequest::Get { id, reply })
            .await
            .unwrap();
        assert_eq!(got, s);
        let list = call(&t, |reply| SessionRequest::List { reply })
            .await
            .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0], s);
        let id = s.id.clone();
        let context = ctx(json!({"recipe": "bread"}));
        let saved = call(&t, |reply| SessionRequest::SetContext {
            id,
            context,
            reply,
        })
        .await
        .unwrap();
        assert_eq!(saved.context["recipe"], "bread");
        t.stop().await;
    }

    #[tokio::test]
    async fn bad_sessions_and_handoffs_are_refused_with_what_is_wrong() {
        let t = TestCore::start("kitchen").await;
        for new in [
            NewSession::default(),
            NewSession {
                user: "u\u{7}".into(),
                ..NewSession::default()
            },
            NewSession {
                user: "ann".into(),
                persona: Some("p".repeat(200)),
                ..NewSession::default()
            },
            NewSession {
                user: "ann".into(),
                context: ctx(json!({"blob": "x".repeat(MAX_SESSION_CONTEXT)})),
                ..NewSession::default()
            },
        ] {
            let got = call(&t, |reply| SessionRequest::Start { new, reply }).await;
            assert!(matches!(got, Err(Error::Invalid(_))), "{got:?}");
        }
        let id = "nope".to_string();
        let got = call(&t, |reply| SessionRequest::Get { id, reply }).await;
        assert!(matches!(got, Err(Error::NotFound(_))), "{got:?}");

        let new = NewSession {
            user: "ann".into(),
            ..NewSession::default()
        };
        let s = call(&t, |reply| SessionRequest::Start { new, reply })
            .await
            .unwrap();
        // To itself: it is here already. To no such device: not found.
        for (to, conflict) in [
            ("kitchen", true),
            (t.peer_id.as_str(), true),
            ("attic", false),
        ] {
            let (id, to) = (s.id.clone(), to.to_string());
            let got = call(&t, |reply| SessionRequest::Handoff { id, to, reply }).await;
            match got {
                Err(Error::Conflict(_)) if conflict => {}
                Err(Error::NotFound(_)) if !conflict => {}
                other => panic!("{other:?}"),
            }
        }
        // Nothing was recorded by the refusals.
        let id = s.id.clone();
        let got = call(&t, |reply| SessionRequest::Get { id, reply })
            .await
            .unwrap();
        assert!(got.handoffs.is_empty());
        t.stop().await;
    }

    #[tokio::test]
    async fn messages_from_devices_that_are_not_named_change_nothing() {
        let t = TestCore::start("kitchen").await;
        let mut events = t.events();
        let new = NewSession {
            user: "ann".into(),
            ..NewSession::default()
        };
        let s = call(&t, |reply| SessionRequest::Start { new, reply })
            .await
            .unwrap();
        while events.try_recv().is_ok() {}
        let commit = SessionMessage::Commit {
            session: s.id.clone(),
            handoff: "h".into(),
        }
        .encode()
        .unwrap();
        // The core's own handlers, as a grant frame from an admitted device would reach
        // them: garbage, an acknowledgement for nothing, and an offer of a session that
        // is active here, not on the sender.
        let offer = SessionMessage::Offer {
            session: s.id.clone(),
            handoff: "h2".into(),
            user: "ann".into(),
            persona: None,
            context: "{}".into(),
        }
        .encode()
        .unwrap();
        t.on_core(move |core| {
            Box::pin(async move {
                core.on_session_message("12D3KooWstranger", b"\xff\x00")
                    .await;
                core.on_session_message("12D3KooWstranger", &commit).await;
                core.on_session_message("12D3KooWstranger", &offer).await;
            })
        })
        .await;
        assert!(
            events.try_recv().is_err(),
            "a dropped message raised an event"
        );
        let id = s.id.clone();
        let got = call(&t, |reply| SessionRequest::Get { id, reply })
            .await
            .unwrap();
        assert_eq!(got.device_id, t.peer_id.as_str());
        t.stop().await;
    }

    #[tokio::test]
    async fn an_offer_is_taken_and_only_its_source_completes_it() {
        let t = TestCore::start("kitchen").await;
        let mut events = t.events();
        let session = DocId::from_bytes([3; 16]).to_string();
        let offer = SessionMessage::Offer {
            session: session.clone(),
            handoff: "h1".into(),
            user: "ann".into(),
            persona: Some("chef".into()),
            context: r#"{"recipe":"soup"}"#.into(),
        }
        .encode()
        .unwrap();
        let commit = SessionMessage::Commit {
            session: session.clone(),
            handoff: "h1".into(),
        }
        .encode()
        .unwrap();
        let (o, c1, c2) = (offer.clone(), commit.clone(), commit);
        t.on_core(move |core| {
            Box::pin(async move {
                core.on_session_message("12D3KooWsource", &o).await;
                // Again: answered again, announced once.
                core.on_session_message("12D3KooWsource", &o).await;
                // Another device cannot complete it; its source can.
                core.on_session_message("12D3KooWother", &c1).await;
                core.on_session_message("12D3KooWsource", &c2).await;
            })
        })
        .await;
        let mut phases = Vec::new();
        while let Ok(e) = events.try_recv() {
            if let Event::Coordination {
                name: "session.handoff",
                data,
                from_peer,
                ..
            } = e
            {
                assert_eq!(from_peer.as_deref(), Some("12D3KooWsource"));
                assert_eq!(data["context"]["recipe"], "soup");
                assert_eq!(data["role"], "target");
                phases.push(data["phase"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(phases, ["started", "completed"]);
        t.stop().await;
    }
}
