//! Engine calls about one schema each: the typed views of entity, registry and home
//! documents, and the calls that create and write them. They go through the generic core
//! in [`super`] ([`Engine::create_document`], [`Engine::transact`]); the calls for rooms,
//! presence, locks and sessions sit beside their schemas in [`crate::schema`].

use std::fmt::Debug;

use automerge::ReadDoc;

use crate::error::Result;
use crate::ids::{DocId, KeyEpoch};
use crate::schema::entity::{self, Entity, EntityUpdate};
use crate::schema::home::{self, Home};
use crate::schema::registry::{self, Registry};
use crate::schema::touched::Touched;
use crate::schema::{DocKind, Header};

use super::{Engine, Output, touched_by};

impl<P: Clone + Ord + Debug> Engine<P> {
    // ----- reads -------------------------------------------------------------

    /// The validated entity view, with the entity's conflict policy applied
    /// to concurrent values (see [`crate::policy`]).
    pub fn entity(&self, doc: DocId) -> Result<Entity> {
        self.resolved_entity(doc).map(|r| r.entity)
    }

    /// The validated registry view.
    pub fn registry(&self, doc: DocId) -> Result<Registry> {
        Registry::read(&self.doc_state(doc)?.doc)
    }

    /// The live entities of registry document `doc` and their documents
    /// ([`Registry::read_index`]).
    pub fn registry_index(&self, doc: DocId) -> Result<Vec<(String, DocId)>> {
        Registry::read_index(&self.doc_state(doc)?.doc)
    }

    /// One entry of registry document `doc`, read without the others.
    pub fn registry_entry(
        &self,
        doc: DocId,
        entity_id: &str,
    ) -> Result<Option<crate::schema::registry::RegistryEntry>> {
        let touched = Touched::Entries([entity_id.to_string()].into());
        Ok(Registry::read_entries(&self.doc_state(doc)?.doc, &touched)?
            .entities
            .remove(entity_id))
    }

    /// The validated home view.
    pub fn home(&self, doc: DocId) -> Result<Home> {
        Home::read(&self.doc_state(doc)?.doc)
    }

    /// The homes a home document is paired with, without reading its keyring.
    pub fn home_paired(
        &self,
        doc: DocId,
    ) -> Result<std::collections::BTreeMap<String, crate::schema::home::PairedHome>> {
        crate::schema::home::paired(&self.doc_state(doc)?.doc)
    }

    /// Only the device records of a home document: cheaper than [`Engine::home`], whose
    /// keyring grows with every document of the home.
    pub fn home_devices(
        &self,
        doc: DocId,
    ) -> Result<std::collections::BTreeMap<String, crate::schema::home::DeviceRecord>> {
        self.with_devices(doc, Clone::clone)
    }

    /// One device's record in home document `doc`, if it has one. Reading it fails when
    /// the device records do not validate, as [`Engine::home_devices`] does.
    pub fn home_device(
        &self,
        doc: DocId,
        peer: &str,
    ) -> Result<Option<crate::schema::home::DeviceRecord>> {
        self.with_devices(doc, |devices| devices.get(peer).cloned())
    }

    /// `f` of the device records of home document `doc`. Admission checks read them on
    /// every frame, and the document changes far less often: they are read once per
    /// change of it.
    fn with_devices<R>(
        &self,
        doc: DocId,
        f: impl FnOnce(&std::collections::BTreeMap<String, crate::schema::home::DeviceRecord>) -> R,
    ) -> Result<R> {
        let ds = self.doc_state(doc)?;
        let changes = ds.doc.stats().num_changes;
        if let Some((at, devices)) = &*ds.devices.0.borrow()
            && *at == changes
        {
            return Ok(f(devices));
        }
        let devices = crate::schema::home::devices(&ds.doc)?;
        let out = f(&devices);
        *ds.devices.0.borrow_mut() = Some((changes, devices));
        Ok(out)
    }

    /// The keyring entries of home document `doc` that `chunk` wrote, read and
    /// validated: `chunk` is the bytes of an incremental [`Output::PersistChunk`] for it.
    /// Finding new keys this way costs what the chunk wrote, where reading the whole
    /// keyring costs one entry per document of the home.
    pub fn home_keys_written(&self, doc: DocId, chunk: &[u8]) -> Result<home::WrappedKeys> {
        let ds = self.doc_state(doc)?;
        let touched = touched_by(&ds.doc, chunk, &home::KEYRING_PATH);
        home::keyring_entries(&ds.doc, &touched)
    }

    /// The entity ids whose entries in registry document `doc` the changes in `chunk`
    /// (as `save_incremental` writes them) wrote, or [`Touched::Everything`] when they
    /// wrote outside the entries or cannot be read.
    pub fn registry_entries_written(&self, doc: DocId, chunk: &[u8]) -> Result<Touched> {
        let ds = self.doc_state(doc)?;
        Ok(touched_by(&ds.doc, chunk, &registry::ENTITIES_PATH))
    }

    // ----- documents ---------------------------------------------------------

    /// Creates an entity document owned by `owner_home`.
    pub fn create_entity(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        entity_id: &str,
        first: &EntityUpdate,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Entity, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, at, by| {
            entity::init(doc, entity_id, owner_home, first, at, by)
        })
    }

    /// Creates a home's empty registry document.
    pub fn create_registry(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Registry, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| registry::init(doc))
    }

    /// Creates a home document with its name.
    pub fn create_home(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        name: &str,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Home, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| home::init(doc, name))
    }

    // ----- local writes ------------------------------------------------------

    /// Writes an entity update as one change, and pushes it.
    pub fn update_entity(
        &mut self,
        id: DocId,
        update: &EntityUpdate,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        self.transact(id, now_ms, correlation_id, |doc, at, by| {
            entity::write(doc, update, at, by)
        })
        .map(|(_, out)| out)
    }
}

impl<P: Clone + Ord + std::fmt::Debug> Engine<P> {
    /// Which entries of the collection map at `path` changed since `since` (heads seen
    /// before), and the heads now. No heads before means everything.
    pub fn touched_since(
        &mut self,
        id: DocId,
        since: &[automerge::ChangeHash],
        path: &[&str],
    ) -> Result<(crate::schema::touched::Touched, Vec<automerge::ChangeHash>)> {
        let ds = self
            .docs
            .get_mut(&id)
            .ok_or(crate::error::Error::UnknownDocument(id))?;
        let heads = ds.doc.get_heads();
        if since.is_empty() {
            return Ok((crate::schema::touched::Touched::Everything, heads));
        }
        let changes = ds.doc.get_changes(since);
        Ok((
            crate::schema::touched::touched_entries_cached(&ds.doc, &changes, path, &mut ds.paths),
            heads,
        ))
    }

    /// What the changes after `since` wrote under each of `paths` (each as in
    /// [`Self::touched_since`]), in order; with no `since`, everything.
    pub fn touched_paths(
        &mut self,
        id: DocId,
        since: &[automerge::ChangeHash],
        paths: &[&[&str]],
    ) -> Result<Vec<crate::schema::touched::Touched>> {
        let ds = self
            .docs
            .get_mut(&id)
            .ok_or(crate::error::Error::UnknownDocument(id))?;
        if since.is_empty() {
            return Ok(vec![
                crate::schema::touched::Touched::Everything;
                paths.len()
            ]);
        }
        let changes = ds.doc.get_changes(since);
        Ok(paths
            .iter()
            .map(|path| {
                crate::schema::touched::touched_entries_cached(
                    &ds.doc,
                    &changes,
                    path,
                    &mut ds.paths,
                )
            })
            .collect())
    }
}
