//! Generations of entity documents: the owner home's admin device cuts an entity whose
//! document passed a threshold into a fresh document (hearth-crdt
//! `engine/generation.rs`), every device moves to the newest generation it can open
//! and carries over what the cut missed, and an old generation is deleted once every
//! device of the home has moved past it and the retention window no longer needs it.
//!
//! A new generation is a new document of the home: its key is wrapped in the home
//! document for every device and it is pushed whole, exactly as a new entity is
//! (`Core::create_shared_doc`), and the registry entry of the entity points at it. The
//! old generation stays an ordinary document (it syncs, so writes made on it
//! concurrently with the cut still reach every holder) until it is deleted.

use std::collections::{BTreeSet, HashMap, HashSet};

use hearth_crdt::DocId;
use hearth_crdt::engine::generation::Generation;
use hearth_crdt::schema::registry;

use crate::config::HistoryConfig;
use crate::core::{Core, append, doc_err, now_ms};

/// Most documents remembered as refused (a bad record is audited once per document).
const MAX_REFUSED: usize = 1024;

/// Local writes to a generation between two looks at deleting the ones behind it.
const DELETE_CHECK_EVERY: u32 = 32;

/// Most generations walked back from the current one.
const MAX_CHAIN: usize = 64;

/// Most documents loaded at start to find the generations held of entities whose current
/// one has not arrived.
const MAX_HELD_CANDIDATES: usize = 1024;

/// The generations service's state, kept with the entities'.
#[derive(Default)]
pub(crate) struct Generations {
    pub(crate) config: HistoryConfig,
    /// Held old generation -> the generation that replaced it.
    successor: HashMap<DocId, DocId>,
    /// A generation the registry names whose content has not arrived yet -> entity id,
    /// one per entity in the index. The entity stays on the generation it was on until
    /// it does.
    waiting: HashMap<DocId, String>,
    /// Documents to look at after the step: a cut, a carry, a deletion.
    due: BTreeSet<DocId>,
    /// Current generations whose older ones may be deletable.
    delete_due: HashSet<DocId>,
    /// Local writes seen per generation, to look at deletion every few of them.
    local_writes: HashMap<DocId, u32>,
    /// Generations whose record was refused, audited once each.
    refused: HashSet<DocId>,
    /// Current generations this device has moved to.
    moved_here: HashSet<DocId>,
    /// The actors that may cut and the ones that must move, from the home document;
    /// cleared when it changes.
    actors: Option<(HashSet<automerge::ActorId>, Vec<automerge::ActorId>)>,
    /// At start, before documents load: generation -> the one it replaces, as the
    /// stored meta records name them (hints; records are checked before anything acts).
    links: HashMap<DocId, DocId>,
}

impl Generations {
    pub(crate) fn new(config: HistoryConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }
}

impl Core {
    /// Notes that `doc` changed: an entity may have passed its threshold, an old
    /// generation may hold a write to carry, a new one may have arrived or gained a
    /// device that moved. The work runs after the step ([`Core::run_generation_work`]).
    pub(crate) fn note_generation_change(&mut self, doc: DocId, remote: bool) {
        let g = &mut self.entities.generations;
        if self.entities.of_doc.contains_key(&doc)
            || g.successor.contains_key(&doc)
            || g.waiting.contains_key(&doc)
        {
            g.due.insert(doc);
            // Devices announce their moves in remote changes; local writes only add
            // versions, so every few of them is often enough to look at deletion.
            let n = g.local_writes.entry(doc).or_default();
            *n = n.wrapping_add(1);
            if remote || n.is_multiple_of(DELETE_CHECK_EVERY) {
                g.delete_due.insert(doc);
            }
        }
    }

    /// At start: the meta record of `doc` says it replaces `prev`.
    pub(crate) fn note_generation_link(&mut self, doc: DocId, prev: DocId) {
        self.entities.generations.links.insert(doc, prev);
    }

    /// The generation `doc` replaces, unvalidated: from the document when it is
    /// loaded, from its meta record otherwise.
    fn prev_hint(&self, doc: DocId) -> Option<DocId> {
        if self.engine.is_loaded(doc) {
            self.engine.generation_prev(doc).ok().flatten()
        } else {
            self.entities.generations.links.get(&doc).copied()
        }
    }

    /// Loads `doc` and the generations behind it (documents are loaded on demand), so
    /// that the work on it reads them all.
    pub(crate) async fn load_chain(&mut self, doc: DocId) {
        let mut at = doc;
        let mut seen = Vec::new();
        while seen.len() < MAX_CHAIN && !seen.contains(&at) {
            self.ensure_loaded(at).await;
            seen.push(at);
            match self.engine.generation_prev(at) {
                Ok(Some(prev)) if self.engine.header(prev).is_ok() => at = prev,
                _ => break,
            }
        }
    }

    /// Whether generation work waits.
    pub(crate) fn generation_work_due(&self) -> bool {
        !self.entities.generations.due.is_empty()
    }

    /// Does the work noted since the last call, loading the documents it reads first.
    pub(crate) async fn run_generation_work(&mut self) {
        let due = std::mem::take(&mut self.entities.generations.due);
        for doc in due {
            let successor = self.entities.generations.successor.get(&doc).copied();
            self.load_chain(successor.unwrap_or(doc)).await;
            if !self.engine.is_loaded(doc) {
                // Not held any more, or its records do not load (quarantined).
                continue;
            }
            if let Some(id) = self.entities.generations.waiting.get(&doc).cloned() {
                if self.has_content(doc) {
                    self.entities.generations.waiting.remove(&doc);
                    // The registry may have moved on (a later cut, or the entity made anew)
                    // while this document was on its way.
                    let named = self
                        .engine
                        .registry_entry(self.home.registry_doc, &id)
                        .ok()
                        .flatten()
                        .is_some_and(|e| e.doc == doc);
                    if named {
                        self.follow(&id, doc);
                    }
                }
                continue;
            }
            if let Some(new) = self.entities.generations.successor.get(&doc).copied() {
                // A write landed on an old generation: carry it over.
                self.move_to(new);
                continue;
            }
            // Only this home's entities have generations here: another home's entity
            // shared with this one is never written outside its value fields.
            let own = self
                .engine
                .header(doc)
                .is_ok_and(|h| h.owner_home == self.home.home_id);
            if own && self.entities.of_doc.contains_key(&doc) {
                self.maybe_cut(doc);
                let behind = self
                    .entities
                    .generations
                    .successor
                    .values()
                    .any(|d| *d == doc);
                if !self.entities.generations.moved_here.contains(&doc)
                    && matches!(self.engine.generation(doc), Ok(Some(_)) | Err(_))
                {
                    self.move_to(doc);
                }
                if behind && self.entities.generations.delete_due.remove(&doc) {
                    self.maybe_delete_before(doc).await;
                }
            }
        }
    }

    /// After the index was rebuilt from the registry: an entity whose registry entry
    /// now names another document follows it when that document is a valid next
    /// generation it holds; it stays where it was while the document has not arrived,
    /// and for good when its record is refused.
    pub(crate) fn follow_registry(&mut self, before: &HashMap<String, DocId>) {
        let moved: Vec<(String, DocId, DocId)> = self
            .entities
            .by_id
            .iter()
            .filter_map(|(id, doc)| match before.get(id) {
                Some(old) if old != doc => Some((id.clone(), *old, *doc)),
                _ => None,
            })
            .collect();
        // One awaited generation per entity: a later cut replaces an earlier one still on
        // its way, and entities deleted meanwhile wait for nothing, so the table holds at
        // most one entry per entity in the index.
        let renamed: HashSet<&str> = moved.iter().map(|(id, _, _)| id.as_str()).collect();
        let by_id = &self.entities.by_id;
        self.entities
            .generations
            .waiting
            .retain(|_, id| by_id.contains_key(id) && !renamed.contains(id.as_str()));
        for (id, old, new) in moved {
            // Until it is shown to be a valid generation, the entity stays on `old`; the
            // generation work after the step loads `new` and follows it once it has
            // content.
            self.point(&id, old);
            let g = &mut self.entities.generations;
            g.waiting.insert(new, id);
            g.due.insert(new);
        }
    }

    /// At start, after the index was built from the registry: an entity whose entry names
    /// a document whose content has not arrived (this device stopped after the registry
    /// change of a cut reached it and before the new generation did) stays on the
    /// generation of it held here, and awaits the named one as [`Core::follow_registry`]
    /// does. Otherwise it would read as absent and refuse writes until the sync brings
    /// the new generation, though every write it acknowledged is here.
    ///
    /// The held generations are found among this home's entity documents that the index
    /// does not name and that no held generation replaced; they are loaded (only when an
    /// entity lacks its document) to read which entity each holds, at most
    /// [`MAX_HELD_CANDIDATES`]. Of several, the one written last is taken. An entity
    /// deleted and made anew on another device whose new document has not arrived would
    /// be shown from its deleted incarnation until it does; writes made there meanwhile
    /// are not carried into the new one.
    pub(crate) async fn stay_on_held_generations(&mut self) {
        let missing: HashMap<String, DocId> = self
            .entities
            .by_id
            .clone()
            .into_iter()
            // Another home's entity shared with this one has no generations here.
            .filter(|(_, doc)| !self.is_foreign_doc(*doc) && !self.has_content(*doc))
            .collect();
        if missing.is_empty() {
            return;
        }
        let home = self.home.home_id.clone();
        let replaced: HashSet<DocId> = self
            .engine
            .documents()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|d| self.prev_hint(d))
            .collect();
        let candidates: Vec<DocId> = self
            .engine
            .documents()
            .filter(|d| !self.entities.of_doc.contains_key(d) && !replaced.contains(d))
            .filter(|d| {
                self.engine
                    .header(*d)
                    .is_ok_and(|h| h.kind == hearth_crdt::DocKind::Entity && h.owner_home == home)
            })
            .take(MAX_HELD_CANDIDATES)
            .collect();
        self.ensure_loaded_many(&candidates).await;
        // The held document of each entity that lacks its document written last: the
        // generation it was on (an incarnation deleted before it was made anew holds
        // older writes).
        let mut held: HashMap<String, (hearth_crdt::Hlc, DocId)> = HashMap::new();
        for doc in candidates {
            if !self.has_content(doc) {
                continue;
            }
            let Ok(entity) = self.engine.entity(doc) else {
                continue;
            };
            if !missing.contains_key(entity.id.as_str()) {
                continue;
            }
            // A generation whose record is refused is never moved to.
            if self.valid_generation(doc).is_err() {
                continue;
            }
            let at = entity.updated_at;
            let best = held.entry(entity.id.to_string()).or_insert((at, doc));
            if at > best.0 {
                *best = (at, doc);
            }
        }
        for (id, (_, doc)) in held {
            let Some(named) = missing.get(&id).copied() else {
                continue;
            };
            tracing::info!(%id, %named, held = %doc, "the entity's current generation has not arrived; staying on the one held here");
            self.point(&id, doc);
            let g = &mut self.entities.generations;
            g.waiting.insert(named, id);
            g.due.insert(named);
        }
    }

    /// Points entity `id` at `doc` in the index.
    fn point(&mut self, id: &str, doc: DocId) {
        if let Some(old) = self.entities.by_id.insert(id.to_string(), doc)
            && old != doc
        {
            self.entities.of_doc.remove(&old);
        }
        self.entities.of_doc.insert(doc, id.to_string());
    }

    /// Moves entity `id` to `new` when its generation record is valid (or when it has
    /// none: an entity made anew after a delete); refuses and audits it otherwise.
    fn follow(&mut self, id: &str, new: DocId) {
        match self.valid_generation(new) {
            Ok(None) => self.point(id, new),
            Ok(Some(g)) => {
                self.point(id, new);
                if self.engine.header(g.prev).is_ok() {
                    self.entities.generations.successor.insert(g.prev, new);
                }
                self.move_to(new);
            }
            Err(reason) => self.refuse_generation(new, reason),
        }
    }

    /// The record of `doc`, checked: written whole by an admin device of the owner home,
    /// which must be this home.
    fn valid_generation(&mut self, doc: DocId) -> Result<Option<Generation>, String> {
        let record = self.engine.generation(doc).map_err(|e| e.to_string())?;
        let Some(g) = record else {
            return Ok(None);
        };
        let owner = self
            .engine
            .header(doc)
            .map_err(|e| e.to_string())?
            .owner_home
            .clone();
        if owner != self.home.home_id {
            return Err("generations of another home's entity are not followed".into());
        }
        if !self.generation_actors().0.contains(&g.cut_by) {
            return Err(format!(
                "cut by {}, which is not the home's admin device",
                g.cut_by
            ));
        }
        Ok(Some(g))
    }

    /// Forgets the devices read from the home document (it changed).
    pub(crate) fn home_devices_changed(&mut self) {
        self.entities.generations.actors = None;
    }

    /// The actors that may cut (the home's verified, unrevoked admin devices) and the
    /// actors of every device that must move before an old generation goes (the home's
    /// unrevoked devices).
    fn generation_actors(&mut self) -> &(HashSet<automerge::ActorId>, Vec<automerge::ActorId>) {
        if self.entities.generations.actors.is_none() {
            let actor = |peer: &str| {
                peer.parse::<hearth_net::PeerId>()
                    .ok()
                    .map(|p| hearth_crdt::ids::actor_for_peer(&p.to_bytes()))
            };
            let devices = self.devices().unwrap_or_default();
            let cutters = devices
                .iter()
                .filter(|d| d.admin && d.verified && !d.revoked)
                .filter_map(|d| actor(&d.peer_id))
                .collect();
            let holders = devices
                .iter()
                .filter(|d| !d.revoked)
                .filter_map(|d| actor(&d.peer_id))
                .collect();
            self.entities.generations.actors = Some((cutters, holders));
        }
        self.entities
            .generations
            .actors
            .get_or_insert_with(Default::default)
    }

    fn refuse_generation(&mut self, doc: DocId, reason: String) {
        // A record that could not be read because its document is not loaded is not a
        // bad record; the work that loads it looks again.
        if !self.engine.is_loaded(doc) {
            tracing::debug!(%doc, %reason, "generation not looked at: not loaded");
            return;
        }
        let refused = &mut self.entities.generations.refused;
        if refused.contains(&doc) || refused.len() >= MAX_REFUSED {
            return;
        }
        refused.insert(doc);
        tracing::warn!(%doc, %reason, "generation refused");
        let store = self.store.clone();
        let subject = format!("{doc}: {reason}");
        let actor = self.peer_id.clone();
        tokio::spawn(async move {
            crate::audit::record_by(&store, &actor, "generation.refused", &subject).await;
        });
    }

    /// Moves this device to generation `new` (carrying what its cut missed) and
    /// persists and pushes what that wrote.
    fn move_to(&mut self, new: DocId) {
        // Moves write into the generation: only into this home's own documents.
        if !self
            .engine
            .header(new)
            .is_ok_and(|h| h.owner_home == self.home.home_id)
        {
            return;
        }
        // Only a generation the home's admin device cut is moved to.
        match self.valid_generation(new) {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(reason) => return self.refuse_generation(new, reason),
        }
        match self.engine.move_to_generation(new, now_ms()) {
            Ok(report) => {
                self.entities.generations.moved_here.insert(new);
                // Once this device has moved, the generations behind may go: look
                // after this step, as after a remote change (the devices that moved
                // earlier have no further change of this one to react to).
                self.entities.generations.delete_due.insert(new);
                self.entities.generations.due.insert(new);
                if report.carried > 0 {
                    tracing::debug!(%new, carried = report.carried, fields = report.fields, "carried writes into a new generation");
                }
                self.persist_in_background(report.outputs);
            }
            Err(error) => tracing::warn!(%new, %error, "cannot move to a new generation"),
        }
    }

    /// Cuts entity document `doc` when this device is the home's admin, the home owns
    /// it, no other home holds it, and it passed a threshold.
    fn maybe_cut(&mut self, doc: DocId) {
        // A cut is a write: none while the store is failing.
        if self.home.root_secret.is_none() || self.store.is_failed() {
            return;
        }
        let Some(id) = self.entities.of_doc.get(&doc).cloned() else {
            return;
        };
        match self.engine.header(doc) {
            Ok(h) if h.owner_home == self.home.home_id => {}
            _ => return,
        }
        let Ok(stats) = self.engine.generation_stats(doc) else {
            return;
        };
        let c = &self.entities.generations.config;
        if stats.changes < c.cut_changes && stats.bytes < c.cut_bytes {
            return;
        }
        // Entities shared with other homes are not cut: their devices hold the
        // document too, and the grants follow one document id.
        match self.engine.registry_entry(self.home.registry_doc, &id) {
            Ok(Some(entry)) if entry.shares.is_empty() => {}
            _ => return,
        }
        if let Err(error) = self.cut(&id, doc) {
            tracing::warn!(%doc, %error, "cannot cut a new generation");
        }
    }

    fn cut(&mut self, id: &str, old: DocId) -> Result<(), crate::Error> {
        let now = now_ms();
        let new = DocId::from_bytes(crate::home::random()?);
        let entity_id = id.to_string();
        let (new, batch) = self.create_shared_doc(new, now, None, |engine, new, epoch, home| {
            let mut out = engine
                .cut_generation(old, new, epoch, now)
                .map_err(doc_err)?;
            let (_, reg) = engine
                .transact(home.registry_doc, now, None, |d, _, _| {
                    registry::put_entity(d, &entity_id, new)
                })
                .map_err(doc_err)?;
            out.extend(reg);
            Ok(out)
        })?;
        self.point(id, new);
        self.entities.generations.successor.insert(old, new);
        self.entities.generations.local_writes.remove(&old);
        self.entities.views.remove(&old);
        tracing::debug!(%old, %new, "cut a new generation");
        self.queue_persist(batch, Vec::new());
        Ok(())
    }

    /// The generations behind `current` that this device holds, newest first.
    pub(crate) fn generation_chain(&mut self, current: DocId) -> Vec<DocId> {
        let mut chain = vec![current];
        let mut at = current;
        while chain.len() < MAX_CHAIN {
            // Only records the admin device wrote link generations.
            let Ok(Some(g)) = self.valid_generation(at) else {
                break;
            };
            if self.engine.header(g.prev).is_err() || chain.contains(&g.prev) {
                break;
            }
            chain.push(g.prev);
            at = g.prev;
        }
        chain
    }

    /// Deletes the generations behind `current` that every device has moved past and
    /// the retention window no longer needs: the newer generations hold at least
    /// `keep_versions` versions, or the older one was cut off more than `keep_days` ago.
    async fn maybe_delete_before(&mut self, current: DocId) {
        let chain = self.generation_chain(current);
        if chain.len() < 2 {
            return;
        }
        let holders = self.generation_actors().1.clone();
        let keep_versions = self.entities.generations.config.keep_versions;
        let keep_ms = u64::from(self.entities.generations.config.keep_days) * 86_400_000;
        let now = now_ms();
        let mut newer_versions = 0usize;
        // Walk from the newest: generation chain[i + 1] may go once every device moved
        // into chain[i] (and so past every generation before it).
        for i in 0..chain.len() - 1 {
            let newer = chain[i];
            newer_versions += self.engine.generation_stats(newer).map_or(0, |s| s.changes);
            let Ok(Some(g)) = self.valid_generation(newer) else {
                return;
            };
            if !holders.iter().all(|a| g.moved.contains(a)) {
                continue;
            }
            let old_enough = now.saturating_sub(g.cut_at_ms) >= keep_ms;
            if newer_versions >= keep_versions || old_enough {
                let mut all = true;
                for old in chain[i + 1..].iter().copied() {
                    all &= self.delete_generation(old).await;
                }
                if !all {
                    // Looked at again with the next change.
                    self.entities.generations.delete_due.insert(current);
                }
                return;
            }
        }
    }

    /// Deletes an old generation from this device: from the engine, and in one store
    /// batch its chunks, meta record, sync states and keys, and (on the admin) its
    /// wrapped keys from the home document. Nothing happens while the store is failing or
    /// a batch holding one of its chunks is still on its way (a chunk landing after the
    /// deletion would be left behind). Returns whether it was deleted.
    async fn delete_generation(&mut self, doc: DocId) -> bool {
        if self.store.is_failed() || self.engine.header(doc).is_err() {
            return false;
        }
        let unstored = self
            .resident
            .unstored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&doc);
        let lost = self
            .unpersisted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .holds(doc);
        if unstored || lost {
            return false;
        }
        let chunks = match crate::core::quarantine::chunk_keys(&self.store, doc).await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(%doc, %error, "cannot list an old generation's chunks");
                return false;
            }
        };
        if !self.engine.remove_document(doc) {
            return false;
        }
        tracing::debug!(%doc, "deleted an old generation");
        self.resident.forget(doc);
        self.entities.generations.successor.remove(&doc);
        self.entities.generations.moved_here.remove(&doc);
        self.entities.generations.local_writes.remove(&doc);
        self.entities.generations.delete_due.remove(&doc);
        self.entities.views.remove(&doc);
        self.forget_digest(doc);
        self.chunk_seq.remove(&doc);
        let mut batch = self.drop_sync_states_of_doc(doc);
        for key in chunks {
            batch.delete(hearth_storage::Keyspace::DocChunks, key);
        }
        batch.delete(
            hearth_storage::Keyspace::Meta,
            crate::records::doc_meta_key(doc),
        );
        self.keyring.forget(doc, &mut batch);
        if self.home.root_secret.is_some() {
            match self
                .engine
                .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                    hearth_crdt::schema::home::remove_wrapped_keys(d, doc)
                }) {
                Ok((_, out)) => {
                    let more = self.handle_outputs(out);
                    append(&mut batch, more);
                }
                Err(error) => tracing::warn!(%doc, %error, "cannot drop an old generation's keys"),
            }
        }
        self.queue_persist(batch, Vec::new());
        true
    }

    /// What the generations of entity `id` hold on this device.
    pub(crate) fn entity_storage(
        &mut self,
        id: &str,
    ) -> Result<crate::entities::EntityStorage, crate::Error> {
        let doc = self.existing_entity(id)?;
        let generation = self
            .engine
            .generation(doc)
            .ok()
            .flatten()
            .map_or(0, |g| g.number);
        let chain = self.generation_chain(doc);
        let (mut changes, mut bytes) = (0, 0);
        for g in &chain {
            let s = self.engine.generation_stats(*g).map_err(doc_err)?;
            changes += s.changes;
            bytes += s.bytes;
        }
        Ok(crate::entities::EntityStorage {
            generation,
            generations_held: chain.len(),
            changes,
            bytes,
        })
    }

    /// At start: finds the old generations held behind each entity, and looks at each
    /// entity once (a move or deletion a stop interrupted finishes now).
    pub(crate) fn index_generations(&mut self) {
        let home = self.home.home_id.clone();
        let current: Vec<DocId> = self
            .entities
            .of_doc
            .keys()
            .copied()
            .filter(|d| self.engine.header(*d).is_ok_and(|h| h.owner_home == home))
            .collect();
        for doc in current {
            // From the meta records' hints: no document loads here (each is checked
            // when the work after the first step loads it).
            let mut chain = vec![doc];
            let mut at = doc;
            while chain.len() < MAX_CHAIN {
                match self.prev_hint(at) {
                    Some(prev) if self.engine.header(prev).is_ok() && !chain.contains(&prev) => {
                        chain.push(prev);
                        at = prev;
                    }
                    _ => break,
                }
            }
            for pair in chain.windows(2) {
                self.entities.generations.successor.insert(pair[1], pair[0]);
            }
            if chain.len() > 1 {
                self.entities.generations.due.insert(doc);
                self.entities.generations.delete_due.insert(doc);
                if let Some(old) = chain.get(1) {
                    self.entities.generations.due.insert(*old);
                }
            }
        }
        self.entities.generations.links = HashMap::new();
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT};
    use hearth_crdt::schema::registry;
    use hearth_crdt::{DocId, DocKind, Header, KeyEpoch};

    use crate::core::testing::TestCore;
    use crate::entities::EntityWrite;

    /// A new generation written by a device that is not the home's admin (here, an
    /// actor no device of the home has) is refused: the entity stays on its document.
    #[tokio::test]
    async fn a_cut_by_another_device_is_refused_and_the_entity_stays() {
        let t = TestCore::start("hall").await;
        let id = "light.hall".to_string();
        t.set_entity(&id, "on").await;
        let home = t.facts.home_id.clone();
        let outcome = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = outcome.clone();
        t.on_core(move |core| {
            Box::pin(async move {
                let old = core.doc_of_entity(&id).unwrap();
                // A forged generation: a whole record, by a stranger's actor.
                let mut d = AutoCommit::new().with_actor(automerge::ActorId::from([9u8; 16]));
                Header::new(DocKind::Entity, home.clone(), KeyEpoch::first([0; 16]))
                    .write(&mut d)
                    .unwrap();
                let e = d.put_object(ROOT, "entity", ObjType::Map).unwrap();
                d.put(&e, "id", id.as_str()).unwrap();
                d.put(&e, "owner", home.as_str()).unwrap();
                d.put(&e, "state", "forged").unwrap();
                d.put_object(&e, "attributes", ObjType::Map).unwrap();
                d.put(
                    &e,
                    "updated_at",
                    format!("{:016x}-{:08x}-{}", 1, 0, "09".repeat(16)),
                )
                .unwrap();
                d.put(&e, "updated_by", "09".repeat(16)).unwrap();
                let g = d.put_object(ROOT, "generation", ObjType::Map).unwrap();
                d.put(&g, "number", 1u64).unwrap();
                d.put(&g, "prev", old.to_string()).unwrap();
                d.put(&g, "prev_heads", "").unwrap();
                d.put_object(&g, "prev_clock", ObjType::Map).unwrap();
                d.put_object(&g, "field_clocks", ObjType::Map).unwrap();
                d.put(&g, "cut_at", 1u64).unwrap();
                let forged = DocId::from_bytes([7; 16]);
                core.engine.load_document(forged, &[d.save()]).unwrap();
                core.engine
                    .transact(core.home.registry_doc, 1, None, |d, _, _| {
                        registry::put_entity(d, &id, forged)
                    })
                    .unwrap();
                core.rebuild_entity_index_lenient();
                // The work after the step loads the new generation and checks it.
                core.run_generation_work().await;
                *seen.lock().unwrap() = Some((
                    core.doc_of_entity(&id) == Some(old),
                    core.entities.generations.refused.contains(&forged),
                    core.entity_view(old).map(|e| e.state).ok(),
                ));
            })
        })
        .await;
        let got = outcome.lock().unwrap().clone();
        assert_eq!(got, Some((true, true, Some("on".to_string()))));
        t.stop().await;
    }

    /// Generations named by the registry that have not arrived are awaited one per
    /// entity: a later cut replaces an earlier one, and a deleted entity awaits none.
    #[tokio::test]
    async fn awaited_generations_are_one_per_entity_and_go_with_it() {
        let t = TestCore::start("hall").await;
        let id = "light.hall".to_string();
        t.set_entity(&id, "on").await;
        let outcome = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = outcome.clone();
        t.on_core(move |core| {
            Box::pin(async move {
                let old = core.doc_of_entity(&id).unwrap();
                let look = |core: &mut crate::core::Core| {
                    let waiting: Vec<(DocId, String)> = core
                        .entities
                        .generations
                        .waiting
                        .iter()
                        .map(|(d, i)| (*d, i.clone()))
                        .collect();
                    seen.lock()
                        .unwrap()
                        .push((core.doc_of_entity(&id) == Some(old), waiting));
                };
                for n in [7u8, 8] {
                    // The registry names a generation this device does not hold yet.
                    let next = DocId::from_bytes([n; 16]);
                    core.engine
                        .transact(core.home.registry_doc, u64::from(n), None, |d, _, _| {
                            registry::put_entity(d, &id, next)
                        })
                        .unwrap();
                    core.rebuild_entity_index_lenient();
                    look(core);
                }
                core.engine
                    .transact(core.home.registry_doc, 9, None, |d, _, _| {
                        registry::tombstone(
                            d,
                            &id,
                            hearth_crdt::Hlc {
                                wall_ms: 9,
                                ..hearth_crdt::Hlc::ZERO
                            },
                        )
                    })
                    .unwrap();
                core.rebuild_entity_index_lenient();
                look(core);
            })
        })
        .await;
        let got = outcome.lock().unwrap().clone();
        let id = "light.hall".to_string();
        assert_eq!(
            got,
            vec![
                (true, vec![(DocId::from_bytes([7; 16]), id.clone())]),
                (true, vec![(DocId::from_bytes([8; 16]), id.clone())]),
                (false, vec![]),
            ]
        );
        t.stop().await;
    }

    /// At start, an entity whose registry entry names a generation that has not arrived
    /// stays on the one held here: it reads and takes writes, and awaits the named one. An
    /// entity with nothing held refuses writes with a clear error.
    #[tokio::test]
    async fn at_start_an_entity_stays_on_its_held_generation() {
        let t = TestCore::start("hall").await;
        let id = "light.hall".to_string();
        // An incarnation of the entity deleted earlier, still held: written before the
        // live one, so not taken.
        let made = id.clone();
        t.on_core(move |core| {
            Box::pin(async move {
                let home = core.home.home_id.clone();
                let epoch = KeyEpoch::first([5; 16]);
                let first = hearth_crdt::schema::entity::EntityUpdate {
                    state: "deleted earlier".into(),
                    attributes: None,
                };
                core.engine
                    .create_entity(DocId::from_bytes([5; 16]), &home, epoch, &made, &first, 1)
                    .unwrap();
            })
        })
        .await;
        t.set_entity(&id, "on").await;
        let outcome = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = outcome.clone();
        t.on_core(move |core| {
            Box::pin(async move {
                let old = core.doc_of_entity(&id).unwrap();
                let next = DocId::from_bytes([7; 16]);
                let other = DocId::from_bytes([8; 16]);

                core.engine
                    .transact(core.home.registry_doc, 7, None, |d, _, _| {
                        registry::put_entity(d, &id, next)?;
                        // Named by the registry, never held here.
                        registry::put_entity(d, "light.gate", other)
                    })
                    .unwrap();
                // As at start: the index built from the registry alone.
                core.entities.by_id.clear();
                core.entities.of_doc.clear();
                core.rebuild_entity_index().unwrap();
                let before = core.doc_of_entity(&id) == Some(next);
                core.stay_on_held_generations().await;
                let waiting = core.entities.generations.waiting.get(&next).cloned();
                let state = core.get_entity(&id).unwrap().map(|e| e.state);
                let write = EntityWrite {
                    state: "off".into(),
                    attributes: None,
                    correlation_id: None,
                };
                let written = core.set_entity(&id, write.clone()).map(|(e, _)| e.state);
                let refused = match core.set_entity("light.gate", write) {
                    Err(crate::Error::Unavailable(m)) => m.contains("not arrived"),
                    _ => false,
                };
                *seen.lock().unwrap() = Some((
                    before,
                    core.doc_of_entity(&id) == Some(old),
                    waiting,
                    state,
                    written.ok(),
                    refused,
                ));
            })
        })
        .await;
        let got = outcome.lock().unwrap().clone();
        assert_eq!(
            got,
            Some((
                true,
                true,
                Some("light.hall".to_string()),
                Some("on".to_string()),
                Some("off".to_string()),
                true,
            ))
        );
        t.stop().await;
    }
}
