//! Incoming frames: pushes and sync messages from peers, parked pushes, recovery
//! after a panic, and generating the next sync message of a session.

use std::collections::BTreeSet;
use std::fmt::Debug;

use automerge::sync::{ChunkList, Message, MessageVersion, State, SyncDoc};
use automerge::{ActorId, AutoCommit, Change, ChangeHash};

use crate::chunks::Scanner;
use crate::error::{Error, Result};
use crate::ids::{DocId, KeyEpoch};
use crate::schema::DocKind;
use crate::schema::touched::{MAX_OBJECT_DEPTH, check_nesting};
use crate::session::SyncSession;
use crate::wire::{Frame, Push, SyncMessage};

use super::guard::{
    Payload, check_actors, check_blooms, check_sync_actors, frame_limits, refused, validate,
};
use super::load::{doc_actors, rebuild};
use super::{
    Engine, EngineConfig, EngineStats, Origin, Output, Parked, catch, note_versions, record_chunk,
    schedule_confirm,
};

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Handles a frame from `peer` whose payload the node has already opened.
    ///
    /// Errors concern this frame only. A failing sync message resets that one
    /// session, which sends a fresh opening message on the next
    /// [`Engine::tick`] (see [`Engine::next_deadline`]).
    pub fn receive(&mut self, peer: P, frame: Frame, now_ms: u64) -> Result<Vec<Output<P>>> {
        self.step_left = self.config.max_growth_per_step_bytes;
        let (doc, result) = match frame {
            Frame::Push(push) => (push.doc, self.receive_push(peer, push, now_ms)),
            Frame::Sync(msg) => (msg.doc, self.receive_sync(peer, msg, now_ms)),
            Frame::Grant(_) => {
                return Err(Error::Wire(
                    "grant frames belong to the node, not the engine".into(),
                ));
            }
            Frame::Digest(_) => {
                return Err(Error::Wire(
                    "digest frames go to the digest reconciler, not the engine".into(),
                ));
            }
        };
        // Only this document's sessions can have moved a deadline, failures included
        // (a reset schedules a fresh opening message).
        self.reschedule(doc);
        result
    }

    fn receive_push(&mut self, peer: P, push: Push, now_ms: u64) -> Result<Vec<Output<P>>> {
        let id = push.doc;
        if push.bytes.len() > self.config.max_push_bytes {
            self.stats.oversized += 1;
            return Err(Error::TooLarge {
                what: "push",
                len: push.bytes.len(),
                cap: self.config.max_push_bytes,
            });
        }
        let Some(ds) = self.docs.get_mut(&id) else {
            return Err(self.missing(id));
        };
        // The peer is there: an exchange with it that restarted for want of an answer
        // waits the base delay again.
        if let Some(session) = ds.sessions.get_mut(&peer) {
            session.unanswered = 0;
        }
        let limits = frame_limits(&self.config, false);
        let scanned = catch(|| {
            let mut scanner = Scanner::new(limits);
            scanner.scan(&push.bytes).map(|()| scanner.changes)
        });
        let changes = match scanned {
            Ok(Ok(c)) => c,
            Ok(Err(refusal)) => {
                return Err(refused(Some(&mut self.stats), id, Payload::Push, refusal));
            }
            Err(()) => {
                self.stats.panics_caught += 1;
                return Err(Error::Panicked {
                    doc: id,
                    during: "parsing a push",
                });
            }
        };
        let mut out = Vec::new();
        let parked = Parked {
            from: peer,
            changes,
            correlation_id: push.correlation_id,
        };
        match self.try_apply(id, parked, now_ms, &mut out)? {
            Applied::Done => {}
            Applied::OverBudget(_, len) => {
                self.stats.oversized += 1;
                return Err(Error::TooLarge {
                    what: "growth of a document in one step",
                    len,
                    cap: self.config.max_growth_per_step_bytes,
                });
            }
            Applied::Waiting(parked) => {
                // Dependencies missing: park it and catch up with the sender.
                self.stats.pushes_deferred += 1;
                let ds = self.docs.get_mut(&id).ok_or(Error::UnknownDocument(id))?;
                let from = parked.from.clone();
                if ds.parked.len() >= self.config.max_pending_pushes {
                    ds.parked.pop_front();
                    self.stats.pushes_evicted += 1;
                }
                ds.parked.push_back(parked);
                let epoch = ds.header.key_epoch;
                let session = ds
                    .sessions
                    .entry(from.clone())
                    .or_insert_with(SyncSession::new);
                session.in_sync = false;
                // An exchange already in flight will carry the catch-up; a
                // fresh one starts from a clean slate so it is not throttled
                // by an unanswered message.
                if session.awaiting_since.is_none() {
                    session.restart();
                }
                generate_into(
                    id,
                    epoch,
                    &from,
                    &mut ds.doc,
                    session,
                    now_ms,
                    &self.config,
                    &mut self.stats,
                    &mut out,
                    false,
                );
            }
        }
        Ok(out)
    }

    /// Applies a push if its dependencies are present and its new changes fit
    /// what this step may still add. Returns it back when not.
    fn try_apply(
        &mut self,
        id: DocId,
        push: Parked<P>,
        now_ms: u64,
        out: &mut Vec<Output<P>>,
    ) -> Result<Applied<P>> {
        let ds = self.docs.get_mut(&id).ok_or(Error::UnknownDocument(id))?;
        let doc = &mut ds.doc;
        let check = catch(|| {
            let heads: BTreeSet<ChangeHash> = doc.get_heads().into_iter().collect();
            let fresh: Vec<&Change> = push
                .changes
                .iter()
                .filter(|c| doc.get_change_meta_by_hash(&c.hash()).is_none())
                .collect();
            let in_batch: BTreeSet<ChangeHash> = fresh.iter().map(|c| c.hash()).collect();
            let ready = fresh.iter().flat_map(|c| c.deps()).all(|d| {
                heads.contains(d)
                    || in_batch.contains(d)
                    || doc.get_change_meta_by_hash(d).is_some()
            });
            let fresh_bytes: usize = fresh.iter().map(|c| c.raw_bytes().len()).sum();
            (fresh.is_empty(), ready, fresh_bytes)
        });
        let (duplicate, ready, fresh_bytes) = match check {
            Ok(v) => v,
            Err(()) => {
                return Err(self.recover(id, "checking push dependencies", &push.from, now_ms));
            }
        };
        if duplicate {
            self.stats.pushes_duplicate += 1;
            return Ok(Applied::Done);
        }
        if !ready {
            return Ok(Applied::Waiting(push));
        }
        if fresh_bytes > self.step_left {
            return Ok(Applied::OverBudget(push, fresh_bytes));
        }
        if let Err(reason) = check_actors(&push.changes, &push.changes, &ds.actors) {
            return Err(Error::Changes { doc: id, reason });
        }
        if let Err(reason) = check_nesting(&ds.doc, &push.changes, MAX_OBJECT_DEPTH) {
            return Err(Error::Changes { doc: id, reason });
        }
        let Parked {
            from,
            changes,
            correlation_id,
        } = push;
        let new_actors: Vec<ActorId> = changes.iter().map(|c| c.actor_id().clone()).collect();
        #[cfg(test)]
        let inject = std::mem::take(&mut self.fail_next_apply);
        #[cfg(not(test))]
        let inject = false;
        let doc = &mut ds.doc;
        match catch(|| {
            assert!(!inject, "injected failure");
            doc.apply_changes(changes)
        }) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // Automerge refused the batch (e.g. a reused sequence number)
                // and may have applied a prefix; record whatever did land.
                self.after_remote_change(id, &from, None, now_ms, out)?;
                return Err(Error::Changes {
                    doc: id,
                    reason: e.to_string(),
                });
            }
            Err(()) => return Err(self.recover(id, "applying a push", &from, now_ms)),
        }
        ds.actors.extend(new_actors);
        self.step_left -= fresh_bytes;
        self.stats.pushes_applied += 1;
        self.after_remote_change(id, &from, correlation_id, now_ms, out)?;
        Ok(Applied::Done)
    }

    fn receive_sync(&mut self, peer: P, msg: SyncMessage, now_ms: u64) -> Result<Vec<Output<P>>> {
        let id = msg.doc;
        let cap = self.config.max_sync_message_bytes;
        let ds = self.docs.get_mut(&id).ok_or(Error::UnknownDocument(id))?;
        let session = ds
            .sessions
            .entry(peer.clone())
            .or_insert_with(SyncSession::new);
        if msg.bytes.len() > cap {
            self.stats.oversized += 1;
            self.stats.session_resets += 1;
            session.reset(now_ms);
            return Err(Error::TooLarge {
                what: "sync message",
                len: msg.bytes.len(),
                cap,
            });
        }
        // Decoding copies each change-list entry as it is: Automerge 0.12's
        // `ChunkList::parse` inflates nothing, so this is bounded by the cap above.
        let decoded = match catch(|| Message::decode(&msg.bytes)) {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                self.stats.session_resets += 1;
                session.reset(now_ms);
                return Err(Error::Sync {
                    doc: id,
                    reason: format!("undecodable message: {e}"),
                });
            }
            Err(()) => return Err(self.recover(id, "decoding a sync message", &peer, now_ms)),
        };
        if let Err(reason) = check_blooms(&decoded) {
            self.stats.session_resets += 1;
            session.reset(now_ms);
            return Err(Error::Sync { doc: id, reason });
        }
        // Every chunk is walked and capped here, and compressed ones refused,
        // before `receive_sync_message` hands them to `load_incremental`.
        let limits = frame_limits(&self.config, true);
        let scanned = catch(|| {
            let mut scanner = Scanner::new(limits);
            for entry in decoded.changes.iter() {
                scanner.scan(entry)?;
            }
            Ok((
                scanner.changes,
                scanner.document_bytes,
                !scanner.documents.is_empty(),
            ))
        });
        let (sync_changes, document_bytes, carried_document) = match scanned {
            Ok(Ok(s)) => s,
            Ok(Err(refusal)) => {
                self.stats.session_resets += 1;
                session.reset(now_ms);
                return Err(refused(Some(&mut self.stats), id, Payload::Sync, refusal));
            }
            Err(()) => return Err(self.recover(id, "parsing sync changes", &peer, now_ms)),
        };
        let doc = &mut ds.doc;
        let known = &ds.actors;
        let actor_check = catch(|| check_sync_actors(doc, &sync_changes, known))
            .unwrap_or_else(|()| Err("checking the changes' actors failed".into()))
            .and_then(|()| check_nesting(doc, &sync_changes, MAX_OBJECT_DEPTH));
        // What the message would add: its changes not here yet, and any whole
        // document in full.
        let fresh = catch(|| {
            sync_changes
                .iter()
                .filter(|c| doc.get_change_meta_by_hash(&c.hash()).is_none())
                .map(|c| c.raw_bytes().len())
                .sum::<usize>()
        })
        .unwrap_or(usize::MAX)
        .saturating_add(document_bytes);
        let session = ds
            .sessions
            .entry(peer.clone())
            .or_insert_with(SyncSession::new);
        if let Err(reason) = actor_check {
            self.stats.session_resets += 1;
            session.reset(now_ms);
            return Err(Error::Sync { doc: id, reason });
        }
        if fresh > self.step_left {
            self.stats.oversized += 1;
            self.stats.session_resets += 1;
            session.reset(now_ms);
            return Err(Error::TooLarge {
                what: "growth of a document in one step",
                len: fresh,
                cap: self.config.max_growth_per_step_bytes,
            });
        }
        self.step_left -= fresh;
        let carried_changes = !decoded.changes.is_empty();
        let was_in_sync = session.in_sync;
        let their_heads = decoded.heads.clone();
        let doc = &mut ds.doc;
        let state = &mut session.state;
        let before = doc.get_heads();
        let shared_before = state.shared_heads.clone();
        let received = catch(|| doc.sync().receive_sync_message(state, decoded));
        session.awaiting_since = None;
        session.unanswered = 0;
        // A peer that asks for changes by hash dropped or never got something we sent
        // (a push it refused or evicted from its parked lot, say): everything it lacks
        // goes again, as its bloom filter shows. Forgetting only the hashes it names
        // would recover one change per round trip, since it names only the first
        // missing change it can see from our heads.
        if session
            .state
            .their_need
            .as_ref()
            .is_some_and(|need| !need.is_empty())
        {
            session.state.sent_hashes.clear();
        }
        let mut out = Vec::new();
        match received {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.stats.session_resets += 1;
                session.reset(now_ms);
                // Changes that did land before the failure are valid; keep
                // the journal and the node's storage in step with them.
                if ds.doc.get_heads() != before {
                    self.after_remote_change(id, &peer, None, now_ms, &mut out)?;
                }
                return Err(Error::Sync {
                    doc: id,
                    reason: e.to_string(),
                });
            }
            Err(()) => return Err(self.recover(id, "receiving a sync message", &peer, now_ms)),
        }
        self.stats.sync_received += 1;
        ds.actors
            .extend(sync_changes.iter().map(|c| c.actor_id().clone()));
        if carried_document {
            // A whole document arrived (v2 catch-up): list its actors from
            // the loaded result rather than parsing the chunk ourselves.
            let doc = &mut ds.doc;
            if let Ok(all) = catch(|| doc_actors(doc)) {
                ds.actors = all;
            }
        }
        if ds.doc.get_heads() != before {
            self.after_remote_change(id, &peer, None, now_ms, &mut out)?;
        }
        let ds = self.docs.get_mut(&id).ok_or(Error::UnknownDocument(id))?;
        let heads = ds.doc.get_heads();
        let epoch = ds.header.key_epoch;
        let Some(session) = ds.sessions.get_mut(&peer) else {
            return Ok(out);
        };
        // A session that was pushing stays in push mode when the peer's heads are all
        // known here: whatever it lacks was pushed after it wrote this message and is on
        // the (ordered) stream to it. Requiring equal heads instead dropped a busy writer
        // into the sync protocol, whose every message walks the whole change history.
        let their_known = session.state.their_heads.as_deref().is_some_and(|theirs| {
            theirs
                .iter()
                .all(|h| catch(|| ds.doc.get_change_meta_by_hash(h).is_some()).unwrap_or(false))
        });
        session.in_sync = session.state.their_heads.as_deref() == Some(heads.as_slice())
            || (was_in_sync && their_known);
        // The peer advertises heads we lack yet sent no changes: it believes
        // it already sent them (Automerge's `sent_hashes`), so they were lost
        // on the way. Ask it to forget what it sent, or the exchange sticks.
        if !carried_changes
            && !session.in_sync
            && !catch(|| ds.doc.get_missing_deps(&their_heads).is_empty()).unwrap_or(true)
        {
            session.state.needs_reset = true;
        }
        // In push mode, a message that asks for no answer (an answer to ours) ends the
        // exchange: the peer holds all it told us of, and whatever it lacks is on the
        // stream as pushes. Answering anyway kept two busy devices trading sync
        // messages, each walking the change history, for as long as either kept writing.
        if !session.in_sync || msg.expects_reply {
            let cut_short = (self.stats.sync_partial, self.stats.oversized);
            let sent = generate_into(
                id,
                epoch,
                &peer,
                &mut ds.doc,
                session,
                now_ms,
                &self.config,
                &mut self.stats,
                &mut out,
                true,
            );
            // Automerge stays silent when the peer's heads equal ours, but this
            // peer is waiting for an answer (to it, silence means a lost message).
            if !sent && msg.expects_reply && their_heads == heads {
                session.state.have_responded = false;
                generate_into(
                    id,
                    epoch,
                    &peer,
                    &mut ds.doc,
                    session,
                    now_ms,
                    &self.config,
                    &mut self.stats,
                    &mut out,
                    true,
                );
            }
            // The peer's heads are all known here and the answer just sent carries in
            // full what it lacks beyond them: everything this device holds is with the
            // peer or on the (ordered) stream to it, so later changes can go as pushes.
            // Waiting for equal heads instead kept a device that writes faster than a
            // round trip in the sync protocol for as long as it kept writing.
            if sent && their_known && cut_short == (self.stats.sync_partial, self.stats.oversized) {
                session.in_sync = true;
            }
        }
        if session.state.shared_heads != shared_before
            && session.state.shared_heads != session.persisted_shared
        {
            session.persisted_shared = session.state.shared_heads.clone();
            out.push(Output::PersistSyncState {
                peer,
                doc: id,
                state: session.encode(),
            });
        }
        Ok(out)
    }

    /// Bookkeeping after remote changes landed: journal and persist them,
    /// validate, report, retry parked pushes, and schedule confirmation rounds
    /// with the other peers (who may need the changes relayed).
    fn after_remote_change(
        &mut self,
        id: DocId,
        from: &P,
        correlation_id: Option<String>,
        now_ms: u64,
        out: &mut Vec<Output<P>>,
    ) -> Result<()> {
        let ds = self.docs.get_mut(&id).ok_or(Error::UnknownDocument(id))?;
        let doc = &mut ds.doc;
        let bytes = match catch(|| doc.save_incremental()) {
            Ok(b) => b,
            Err(()) => return Err(self.recover(id, "saving incremental changes", from, now_ms)),
        };
        if bytes.is_empty() {
            return Ok(());
        }
        let schema_error = validate(ds, &mut self.clock, now_ms, &bytes).err();
        note_versions(ds, &bytes);
        if schema_error.is_some() {
            self.stats.schema_violations += 1;
        } else if ds.header.kind == DocKind::Entity {
            // Conflicts are audited where they form: here, as changes merge.
            let fresh = crate::chunks::parse_changes(&bytes, usize::MAX)
                .map(|cs| cs.iter().map(|c| c.hash()).collect())
                .unwrap_or_default();
            let doc = &ds.doc;
            let homes = &self.homes;
            let found = catch(|| crate::policy::detect(id, doc, &fresh, homes, now_ms));
            if let Ok(Ok(records)) = found {
                out.extend(records.into_iter().map(Output::Conflict));
            }
        }
        out.push(Output::Changed {
            doc: id,
            origin: Origin::Peer(from.clone()),
            correlation_id,
            heads: ds.doc.get_heads(),
            schema_error,
        });
        for (peer, session) in ds.sessions.iter_mut() {
            if peer != from {
                schedule_confirm(session, now_ms, &self.config, out);
            }
        }
        record_chunk(id, ds, bytes, &self.config, &mut self.stats, out);
        self.unpark(id, now_ms, out)
    }

    /// Retries parked pushes until none makes progress.
    fn unpark(&mut self, id: DocId, now_ms: u64, out: &mut Vec<Output<P>>) -> Result<()> {
        loop {
            let Some(ds) = self.docs.get_mut(&id) else {
                return Ok(());
            };
            let mut waiting = std::mem::take(&mut ds.parked);
            let mut progressed = false;
            while let Some(p) = waiting.pop_front() {
                let before = self.stats.pushes_applied + self.stats.pushes_duplicate;
                match self.try_apply(id, p, now_ms, out) {
                    // Over this step's growth budget: it waits for a later call.
                    Ok(Applied::Waiting(still) | Applied::OverBudget(still, _)) => {
                        if let Some(ds) = self.docs.get_mut(&id) {
                            ds.parked.push_back(still);
                        }
                    }
                    Ok(Applied::Done) => {
                        if self.stats.pushes_applied + self.stats.pushes_duplicate > before {
                            self.stats.pushes_unparked += 1;
                        }
                        progressed = true;
                    }
                    Err(e) => {
                        // Keep the rest; this one was malformed or panicked.
                        if let Some(ds) = self.docs.get_mut(&id) {
                            ds.parked.extend(waiting);
                        }
                        return Err(e);
                    }
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    /// After a panic: rebuilds the document from its journal, resets the
    /// session of the peer whose input caused it, and returns the error.
    fn recover(&mut self, id: DocId, during: &'static str, peer: &P, now_ms: u64) -> Error {
        self.stats.panics_caught += 1;
        self.stats.session_resets += 1;
        let actor = self.actor.clone();
        if let Some(ds) = self.docs.get_mut(&id) {
            if let Some(s) = ds.sessions.get_mut(peer) {
                s.reset(now_ms);
            }
            ds.parked.retain(|p| &p.from != peer);
            let journal = &ds.journal;
            if let Ok(Ok(mut doc)) = catch(|| rebuild(&actor, journal)) {
                let _ = catch(|| doc.save_incremental());
                ds.doc = doc;
                ds.unchecked = None;
                // The rebuilt document may lack changes the log listed, and so hold
                // other changes under a count the cache saw.
                ds.versions = None;
                ds.devices = Default::default();
                self.stats.documents_recovered += 1;
            }
        }
        Error::Panicked { doc: id, during }
    }
}

/// Whether a push was applied.
enum Applied<P> {
    /// Applied, or held nothing new.
    Done,
    /// Its dependencies are missing.
    Waiting(Parked<P>),
    /// Its new changes (this many bytes) exceed what the step may still add.
    OverBudget(Parked<P>, usize),
}

/// Generates the session's next sync message, if any, into `out`. `answering` is true
/// for the answer to a message just received, false for a message that opens an
/// exchange.
#[allow(clippy::too_many_arguments)]
pub(super) fn generate_into<P: Clone>(
    id: DocId,
    epoch: KeyEpoch,
    peer: &P,
    doc: &mut AutoCommit,
    session: &mut SyncSession,
    now_ms: u64,
    config: &EngineConfig,
    stats: &mut EngineStats,
    out: &mut Vec<Output<P>>,
    answering: bool,
) -> bool {
    let heads = doc.get_heads();
    let state = &mut session.state;
    // What was offered before this message, so an over-cap message can hand back
    // the changes it leaves out. Usually small: Automerge trims it to what the peer
    // has not acknowledged.
    let sent_before = state.sent_hashes.clone();
    let generated = catch(|| doc.sync().generate_sync_message(state).map(Message::encode));
    let mut bytes = match generated {
        Ok(Some(b)) => b,
        Ok(None) => return false,
        Err(()) => {
            // Generation reads only our own document; a panic here is an
            // Automerge bug on local state. Start the session over later.
            stats.panics_caught += 1;
            stats.session_resets += 1;
            session.reset(now_ms.saturating_add(config.retry_after_ms));
            return false;
        }
    };
    if bytes.len() > config.max_sync_message_bytes {
        let cap = config.max_sync_message_bytes;
        let state = &mut session.state;
        match catch(|| fit_to_cap(doc, state, &sent_before, &bytes, cap)) {
            Ok(Some(smaller)) => {
                stats.sync_partial += 1;
                bytes = smaller;
            }
            _ => {
                // Not even the first change the peer lacks fits: the peer would
                // refuse it, so it is counted and the exchange waits for new input
                // rather than resending it on every retry.
                stats.oversized += 1;
                session.restart();
                session.in_sync = false;
                return false;
            }
        }
    }
    // An answer is due unless the peer already told us it has our heads, or this is
    // itself an answer, in push mode, to a peer that holds nothing unknown here: what
    // it lacks then is on the stream to it as pushes, and it answers anyway if it
    // finds anything missing. A message that opens an exchange (a confirmation round,
    // a relay, a catch-up) always asks for an answer, so a lost one is sent again.
    let expects_reply = match session.state.their_heads.as_deref() {
        Some(theirs) if theirs == heads.as_slice() => false,
        Some(theirs) if answering && session.in_sync => !theirs
            .iter()
            .all(|h| catch(|| doc.get_change_meta_by_hash(h).is_some()).unwrap_or(false)),
        _ => true,
    };
    if !expects_reply {
        // Nothing will come back to clear Automerge's in-flight mark, and while it is
        // set and our heads stay put, the next confirmation round would generate
        // nothing: a change this message carried that the peer then dropped would
        // wait for our next write.
        session.state.in_flight = false;
    } else {
        session.awaiting_since = Some(now_ms);
        out.push(Output::Timer {
            at_ms: now_ms.saturating_add(session.retry_delay(config.retry_after_ms)),
        });
    }
    stats.sync_sent += 1;
    out.push(Output::Send {
        peer: peer.clone(),
        frame: Frame::Sync(SyncMessage {
            doc: id,
            epoch,
            expects_reply,
            bytes,
        }),
    });
    true
}

/// Rewrites an encoded sync message that is over `cap` into one within it, carrying
/// the longest causal prefix of its changes that fits, or `None` when not even one
/// change does.
///
/// Automerge builds one message with every change the peer lacks, or, when that is
/// over a third of the document or the peer holds nothing, the whole document saved
/// as one chunk; either may exceed any frame cap. The message keeps its heads, needs,
/// bloom filter and flags; only the changes shrink. The changes left out are removed
/// from `sent_hashes` again, so the next message offers them: the receiver applies the
/// prefix (its dependencies are there, being a prefix in causal order), answers with
/// its new heads, and the exchange goes on from there, one capped message per round.
fn fit_to_cap(
    doc: &mut AutoCommit,
    state: &mut State,
    sent_before: &BTreeSet<ChangeHash>,
    encoded: &[u8],
    cap: usize,
) -> Option<Vec<u8>> {
    let msg = Message::decode(encoded).ok()?;
    let offered: BTreeSet<ChangeHash> =
        state.sent_hashes.difference(sent_before).copied().collect();
    // The peer holds everything up to its heads that are known here, so only what
    // follows them in causal order is a candidate; that also drops the part of a
    // whole-document message the peer already has.
    let base: Vec<ChangeHash> = state
        .their_heads
        .iter()
        .flatten()
        .filter(|h| doc.get_change_meta_by_hash(h).is_some())
        .copied()
        .collect();
    let skeleton = Message {
        changes: ChunkList::empty(),
        // A list of changes is a v1 message, as Automerge itself sends one.
        version: MessageVersion::V1,
        ..msg
    };
    // Each change adds its bytes and a length prefix of at most five bytes, and the
    // count in front of the list grows by at most four.
    let mut room = cap.checked_sub(skeleton.clone().encode().len() + 4)?;
    let mut chosen = Vec::new();
    for change in doc.get_changes(&base) {
        if !offered.contains(&change.hash()) {
            continue;
        }
        let len = change.raw_bytes().len() + 5;
        if len > room {
            // Stop at the first change that does not fit: a later, smaller one
            // may depend on it.
            break;
        }
        room -= len;
        chosen.push(change);
    }
    if chosen.is_empty() {
        return None;
    }
    state.sent_hashes = sent_before.clone();
    state.sent_hashes.extend(chosen.iter().map(|c| c.hash()));
    let changes: Vec<Vec<u8>> = chosen.iter().map(|c| c.raw_bytes().to_vec()).collect();
    let bytes = Message {
        changes: ChunkList::from(changes),
        ..skeleton
    }
    .encode();
    (bytes.len() <= cap).then_some(bytes)
}
