//! Entity deletion, history and restore.
//!
//! A delete tombstones the entity in the home's registry document (`deleted_at`), which
//! syncs to every device like any registry change; each device drops the entity from its
//! index when the registry arrives and announces `entity.deleted`. The entity's own
//! document stays, so its history survives and a later `set` of the same id starts a new
//! document (the registry entry then points at it and the tombstone is cleared).

use hearth_crdt::schema::registry;
use hearth_crdt::{DocId, Error as CrdtError};
use hearth_storage::Batch;

use std::collections::HashMap;

use tokio::sync::oneshot;

use crate::Error;
use crate::core::{Core, Reply, doc_err, now_ms, rfc3339_ms};
use crate::entities::{Entity, EntityVersion};

impl Core {
    pub(crate) fn existing_entity(&mut self, id: &str) -> Result<DocId, Error> {
        match self.doc_of_entity(id) {
            Some(doc) if self.has_content(doc) => Ok(doc),
            _ => Err(Error::NotFound(format!("no entity {id:?}"))),
        }
    }

    pub(crate) fn delete_entity(&mut self, id: &str) -> Result<(Entity, Batch), Error> {
        let doc = self.existing_entity(id)?;
        let entity = self.entity_view(doc)?;
        let (_, out) = self
            .engine
            .transact(self.home.registry_doc, now_ms(), None, |d, at, _| {
                registry::tombstone(d, id, at)
            })
            .map_err(doc_err)?;
        self.entities.of_doc.remove(&doc);
        self.entities.by_id.remove(id);
        let mut batch = self.handle_outputs(out);
        crate::core::append(&mut batch, self.drop_sync_states_of_doc(doc));
        self.emit_change(entity.clone(), None, None, true);
        Ok((entity, batch))
    }

    /// Answers with the newest `limit` versions. The core only takes a snapshot (the
    /// engine's log entries, plus a copy of the document when some clock is still
    /// unread, and the names of their writers); the listing is finished on a read job.
    pub(crate) fn entity_history(
        &mut self,
        id: &str,
        limit: usize,
        reply: Reply<Vec<EntityVersion>>,
    ) {
        // The generations this device holds, newest first, each up to `limit` versions:
        // history runs on across cuts as far as the old generations are kept.
        let snapshots = self.existing_entity(id).and_then(|doc| {
            let chain = self.generation_chain(doc);
            let mut out = Vec::with_capacity(chain.len());
            let mut left = limit;
            for g in chain {
                if left == 0 {
                    break;
                }
                let s = self.engine.history_snapshot(g, left).map_err(doc_err)?;
                left = left
                    .saturating_sub(self.engine.generation_stats(g).map_or(left, |s| s.changes));
                out.push(s);
            }
            Ok(out)
        });
        let snapshots = match snapshots {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let mut names: HashMap<automerge::ActorId, String> = HashMap::new();
        for snapshot in &snapshots {
            for actor in snapshot.actors() {
                if !names.contains_key(actor) {
                    let name = self.device_of_actor(actor);
                    names.insert(actor.clone(), name);
                }
            }
        }
        let home_id = self.home.home_id.clone();
        #[cfg(test)]
        let gate = tests::gate_for(id);
        self.spawn_read(reply, move || {
            #[cfg(test)]
            if let Some(gate) = gate {
                gate.hold();
            }
            // Oldest generation first, each oldest first; the newest `limit` are kept.
            let mut versions: Vec<hearth_crdt::Version> = Vec::new();
            for snapshot in snapshots.into_iter().rev() {
                versions.extend(snapshot.versions());
            }
            let skip = versions.len().saturating_sub(limit);
            Ok(versions
                .into_iter()
                .skip(skip)
                .map(|v| EntityVersion {
                    device: names
                        .get(&v.actor)
                        .cloned()
                        .unwrap_or_else(|| v.actor.to_hex_string())
                        .into(),
                    version: v.id,
                    time: rfc3339_ms(v.at.wall_ms),
                    home: v.home.or_else(|| Some(home_id.clone())).map(Into::into),
                })
                .collect())
        });
    }

    /// Restores `version`. The core finds the version in the entity's log and takes a
    /// copy of the document; a read job reads the entity as of that version (which walks
    /// history) and hands it back as [`crate::entities::service::EntityRequest::WriteRestored`], written on the core as
    /// every write is.
    pub(crate) fn restore_entity(&mut self, id: &str, version: &str, reply: Reply<Entity>) {
        // The version may be in an older generation still held; the restore is written
        // into the current one.
        let read = self.existing_entity(id).and_then(|doc| {
            for g in self.generation_chain(doc) {
                match self.engine.version_read(g, version) {
                    Ok(read) => return Ok((doc, read)),
                    Err(CrdtError::Version { reason, .. }) if reason.starts_with("no such") => {}
                    Err(e @ CrdtError::Version { .. }) => {
                        return Err(Error::Invalid(e.to_string()));
                    }
                    Err(other) => return Err(doc_err(other)),
                }
            }
            Err(Error::NotFound(format!(
                "entity {id:?} has no version {version:?}"
            )))
        });
        let ((doc, read), tx) = match (read, self.self_tx.clone()) {
            (Ok(read), Some(tx)) => (read, tx),
            (Err(e), _) => {
                let _ = reply.send(Err(e));
                return;
            }
            (Ok(_), None) => {
                let _ = reply.send(Err(Error::Internal("the core cannot reach itself".into())));
                return;
            }
        };
        #[cfg(test)]
        let gate = tests::gate_for(id);
        let (resolved, job) = oneshot::channel();
        self.spawn_read(resolved, move || {
            #[cfg(test)]
            if let Some(gate) = gate {
                gate.hold();
            }
            read.resolve().map(|r| r.entity).map_err(doc_err)
        });
        let id = id.to_string();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                match job.await {
                    Ok(Ok(target)) => {
                        // A core that stopped drops the request, and with it the reply.
                        let _ = tx
                            .send(
                                crate::entities::service::EntityRequest::WriteRestored {
                                    id,
                                    doc,
                                    target,
                                    reply,
                                }
                                .into(),
                            )
                            .await;
                    }
                    Ok(Err(e)) => {
                        let _ = reply.send(Err(e));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(Error::Internal("restore read dropped".into())));
                    }
                }
            },
            tracing::error_span!("restore"),
        ));
    }

    /// Writes an old version's view, resolved by a restore's read job, as a new version.
    /// The entity may have been deleted (or made anew) while the job ran.
    pub(crate) fn write_restored(
        &mut self,
        id: &str,
        doc: DocId,
        target: hearth_crdt::Entity,
    ) -> Result<(Entity, Batch), Error> {
        if self.existing_entity(id)? != doc {
            return Err(Error::NotFound(format!(
                "entity {id:?} was made anew while it was being restored"
            )));
        }
        let (_, out) = self
            .engine
            .write_restored(doc, target, now_ms(), None)
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        Ok((self.entity_view(doc)?, batch))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
    use std::time::Duration;

    use serde_json::json;
    use tokio::time::timeout;

    use crate::{Config, EntityWrite, Node};

    /// A read job (history, or a restore's read of the old version) of one entity, held
    /// before it computes anything.
    pub(crate) struct Gate {
        entered: SyncSender<()>,
        release: Receiver<()>,
    }

    impl Gate {
        /// Says the job started, then waits to be let go (or for the test to end).
        pub(crate) fn hold(self) {
            let _ = self.entered.send(());
            let _ = self.release.recv();
        }
    }

    /// Gates by entity id; ids are unique to the test that sets them.
    static GATES: Mutex<Vec<(String, Gate)>> = Mutex::new(Vec::new());

    pub(crate) fn gate_for(id: &str) -> Option<Gate> {
        let mut gates = GATES.lock().unwrap_or_else(|e| e.into_inner());
        let at = gates.iter().position(|(g, _)| g == id)?;
        Some(gates.swap_remove(at).1)
    }

    const T: Duration = Duration::from_secs(30);
    /// Each side of a gate signals once.
    const GATE_SIGNALS: usize = 1;

    pub(crate) fn write(state: &str) -> EntityWrite {
        EntityWrite {
            state: state.into(),
            attributes: json!({"level": 1}).as_object().cloned(),
            correlation_id: None,
        }
    }

    /// While an entity's history is being read, the core keeps answering: the read
    /// runs on a snapshot, off the core.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    pub(crate) async fn reads_answer_while_a_history_read_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            mdns: false,
            ..Config::default()
        };
        let node = timeout(T, Node::start(config)).await.unwrap().unwrap();
        let entities = node.entities();
        for state in ["on", "off", "on"] {
            timeout(T, entities.set("light.held_history", write(state)))
                .await
                .unwrap()
                .unwrap();
        }
        timeout(T, entities.set("light.other", write("dim")))
            .await
            .unwrap()
            .unwrap();

        let (entered_tx, entered) = sync_channel(GATE_SIGNALS);
        let (release, release_rx) = sync_channel(GATE_SIGNALS);
        GATES.lock().unwrap().push((
            "light.held_history".into(),
            Gate {
                entered: entered_tx,
                release: release_rx,
            },
        ));
        let history = tokio::spawn({
            let entities = node.entities();
            async move { entities.history("light.held_history", 10).await }
        });
        timeout(T, tokio::task::spawn_blocking(move || entered.recv()))
            .await
            .unwrap()
            .unwrap()
            .expect("the history job starts");

        // The job is held: the core must still answer a read and a write.
        let other = timeout(T, entities.get("light.other"))
            .await
            .expect("a read answers while a history read is pending")
            .unwrap()
            .unwrap();
        assert_eq!(other.state, "dim");
        timeout(T, entities.set("light.other", write("off")))
            .await
            .expect("a write answers while a history read is pending")
            .unwrap();
        let listed = timeout(T, entities.list()).await.unwrap().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].state, "off");
        assert!(!history.is_finished(), "the history read is still held");

        release.send(()).unwrap();
        let versions = timeout(T, history).await.unwrap().unwrap().unwrap();
        // The creating write and the two after it.
        assert_eq!(versions.len(), 3, "{versions:?}");
        let current = timeout(T, entities.get("light.held_history"))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(versions.last().unwrap().version, current.version);
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }

    /// While a restore reads the old version, the core keeps answering; the restore then
    /// writes that version's state as a new version.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    pub(crate) async fn reads_answer_while_a_restore_read_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            mdns: false,
            ..Config::default()
        };
        let node = timeout(T, Node::start(config)).await.unwrap().unwrap();
        let entities = node.entities();
        let mut made = Vec::new();
        for state in ["on", "off", "dim"] {
            made.push(
                timeout(T, entities.set("light.held_restore", write(state)))
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        timeout(T, entities.set("light.bystander", write("on")))
            .await
            .unwrap()
            .unwrap();

        let (entered_tx, entered) = sync_channel(GATE_SIGNALS);
        let (release, release_rx) = sync_channel(GATE_SIGNALS);
        GATES.lock().unwrap().push((
            "light.held_restore".into(),
            Gate {
                entered: entered_tx,
                release: release_rx,
            },
        ));
        let version = made[0].version[..12].to_string();
        let restore = tokio::spawn({
            let entities = node.entities();
            async move { entities.restore("light.held_restore", &version).await }
        });
        timeout(T, tokio::task::spawn_blocking(move || entered.recv()))
            .await
            .unwrap()
            .unwrap()
            .expect("the restore's read job starts");

        // The read of the old version is held: the core still answers reads and writes.
        let held = timeout(T, entities.get("light.held_restore"))
            .await
            .expect("a read answers while a restore read is pending")
            .unwrap()
            .unwrap();
        assert_eq!(held.state, "dim", "nothing is written before the read");
        timeout(T, entities.set("light.bystander", write("off")))
            .await
            .expect("a write answers while a restore read is pending")
            .unwrap();
        let bystander = timeout(T, entities.get("light.bystander"))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(bystander.state, "off");
        assert!(!restore.is_finished(), "the restore read is still held");

        release.send(()).unwrap();
        let restored = timeout(T, restore).await.unwrap().unwrap().unwrap();
        assert_eq!(restored.state, "on");
        assert_ne!(restored.version, made[0].version, "a new version");
        let now = timeout(T, entities.get("light.held_restore"))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (now.state.as_str(), &now.version),
            ("on", &restored.version)
        );
        let versions = timeout(T, entities.history("light.held_restore", 10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(versions.len(), 4, "history only grows: {versions:?}");
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }

    /// Listing shares reads the registry on a read job: while it is held, the core
    /// answers; released, the listing shows the shares.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    pub(crate) async fn reads_answer_while_a_share_listing_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            mdns: false,
            ..Config::default()
        };
        let node = timeout(T, Node::start(config)).await.unwrap().unwrap();
        let entities = node.entities();
        timeout(T, entities.set("light.unshared", write("on")))
            .await
            .unwrap()
            .unwrap();

        let (entered_tx, entered) = sync_channel(GATE_SIGNALS);
        let (release, release_rx) = sync_channel(GATE_SIGNALS);
        GATES.lock().unwrap().push((
            format!("shares:{}", node.home_id()),
            Gate {
                entered: entered_tx,
                release: release_rx,
            },
        ));
        let listing = tokio::spawn({
            let shares = node.shares();
            async move { shares.list().await }
        });
        timeout(T, tokio::task::spawn_blocking(move || entered.recv()))
            .await
            .unwrap()
            .unwrap()
            .expect("the share listing job starts");

        let got = timeout(T, entities.get("light.unshared"))
            .await
            .expect("a read answers while a share listing is pending")
            .unwrap()
            .unwrap();
        assert_eq!(got.state, "on");
        assert!(!listing.is_finished(), "the share listing is still held");

        release.send(()).unwrap();
        let list = timeout(T, listing).await.unwrap().unwrap().unwrap();
        assert!(list.shared_out.is_empty() && list.shared_in.is_empty());
        let homes = timeout(T, node.shares().homes()).await.unwrap().unwrap();
        assert!(homes.is_empty());
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}
