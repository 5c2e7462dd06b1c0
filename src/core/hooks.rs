//! Test hooks: what the integration tests need to play faults and hostile peers, built
//! only with the `test-hooks` feature. Nothing here is reachable from a release build,
//! and no production path asks whether a hook is set, so no hook can weaken a check.

use hearth_crdt::EntityUpdate;
use hearth_crdt::schema::home as home_schema;
use hearth_crdt::wire::{self, Frame};
use hearth_storage::Batch;

use super::peers::MAX_FRAME_BYTES;
use super::{Core, Reply, doc_err, now_ms};
use crate::trust::keys::RecordKind;
use crate::{Entity, EntityWrite, Error};

/// Test hooks: requests that only the project's own tests make.
pub(crate) enum HookRequest {
    /// Test hook: a write that skips this home's own check of its rights on the entity,
    /// to show the owner refuses it (see `Node::debug_write_unchecked`).
    SetEntityUnchecked {
        id: String,
        write: EntityWrite,
        /// Instead of the entity's value, move its document's key epoch to this counter,
        /// as a writer home's library rewriting the header would.
        header_epoch: Option<u64>,
        reply: Reply<Entity>,
    },
    /// Test hook: writes the home document as a device of the home that wants a revoked
    /// device back would: `revoked_at` cleared and the signed record deleted.
    ClearRevocation { peer: String, reply: Reply<()> },
    /// Test hook: record every frame received from now on (see `Node::debug_capture`).
    Capture { sink: CaptureSink, reply: Reply<()> },
    /// Test hook: try to open a captured frame with this device's keys.
    OpenFrame { bytes: Vec<u8>, reply: Reply<()> },
    /// Test hook: seal a sync message payload for an entity's document.
    SealSync {
        entity: String,
        payload: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    /// Test hook: whether an entity's document is loaded (`None`: no such entity). It
    /// loads nothing itself.
    DocumentLoaded {
        id: String,
        reply: Reply<Option<bool>>,
    },
    /// Test hook: the sync sessions of an entity's document, as text.
    Sessions { id: String, reply: Reply<String> },
}

/// Where received frames are recorded (see `Node::debug_capture`).
pub(crate) type CaptureSink = std::sync::Arc<std::sync::Mutex<Vec<crate::node::Captured>>>;

impl Core {
    /// Test hook: records a received frame as it arrived.
    pub(crate) fn capture_raw(&self, peer: &str, stream: &'static str, bytes: &[u8]) {
        if let Some(sink) = &self.capture
            && let Ok(mut list) = sink.lock()
        {
            list.push(crate::node::Captured {
                peer: peer.to_string(),
                stream,
                raw: bytes.to_vec(),
                opened: None,
            });
        }
    }

    /// Test hook: adds the opened payload to the frame recorded last from `peer`.
    pub(crate) fn capture_opened(&self, peer: &str, frame: &Frame) {
        let Some(sink) = &self.capture else {
            return;
        };
        let payload = match frame {
            Frame::Push(p) => p.bytes.clone(),
            Frame::Sync(s) => s.bytes.clone(),
            _ => return,
        };
        if let Ok(mut list) = sink.lock()
            && let Some(last) = list.iter_mut().rev().find(|c| c.peer == peer)
        {
            last.opened = Some(payload);
        }
    }

    /// Test hook: tries to open a frame with this device's keys, applying nothing.
    pub(crate) fn debug_open_frame(&self, bytes: &[u8]) -> Result<(), crate::Error> {
        let frame = wire::decode(bytes, MAX_FRAME_BYTES)
            .map_err(|e| crate::Error::Invalid(format!("not a frame: {e}")))?;
        let (doc, epoch, kind, sealed) = match &frame {
            Frame::Push(p) => (p.doc, p.epoch, RecordKind::Push, &p.bytes),
            Frame::Sync(s) => (s.doc, s.epoch, RecordKind::SyncMessage, &s.bytes),
            _ => return Err(crate::Error::Invalid("not a push or sync frame".into())),
        };
        crate::peers::admission::open_sealed(&self.keyring, doc, epoch, kind, sealed)
            .map(|_| ())
            .map_err(|e| crate::Error::Forbidden(format!("cannot open: {e}")))
    }

    /// Test hook: `payload` as a sync frame for `entity`'s document at its current
    /// epoch, sealed under this device's key for it, ready for `Node::debug_send_raw`.
    pub(crate) fn debug_seal_sync(
        &self,
        entity: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, crate::Error> {
        let doc = self
            .doc_of_entity(entity)
            .ok_or_else(|| crate::Error::NotFound(format!("no entity {entity}")))?;
        let epoch = self
            .engine
            .header(doc)
            .map_err(|e| crate::Error::Invalid(e.to_string()))?
            .key_epoch;
        let frame = Frame::Sync(hearth_crdt::wire::SyncMessage {
            doc,
            epoch,
            expects_reply: true,
            bytes: payload,
        });
        self.seal_frame(frame).map_err(crate::Error::Forbidden)
    }

    /// Test hook: undoes a revocation in the home document the only ways a device of the
    /// home could (an unsigned `revoked_at` reset, the signed record deleted), so a test
    /// can show that neither lets the device back in.
    pub(crate) fn debug_clear_revocation(&mut self, peer: &str) -> Result<(), Error> {
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .map_err(doc_err)?;
        let mut record = devices
            .get(peer)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no device {peer}")))?;
        record.revoked_at = None;
        let (_, out) = self
            .engine
            .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                home_schema::put_device(d, peer, &record)?;
                home_schema::remove_revocation(d, peer)
            })
            .map_err(doc_err)?;
        self.persist_in_background(out);
        Ok(())
    }

    /// Test hook: writes an existing entity as a local write does, but without the check
    /// of this home's rights on it, so a test can play a home whose library wrote past
    /// its own node's check. The production write path is untouched: this goes to the
    /// engine directly, and the change leaves as the usual push to every peer.
    pub(crate) fn debug_write_unchecked(
        &mut self,
        id: &str,
        write: EntityWrite,
        header_epoch: Option<u64>,
    ) -> Result<(Entity, Batch), Error> {
        let doc = self
            .doc_of_entity(id)
            .ok_or_else(|| Error::NotFound(format!("no entity {id}")))?;
        if let Some(counter) = header_epoch {
            let epoch = hearth_crdt::KeyEpoch {
                counter,
                device: *self.engine_actor_bytes(),
            };
            // Written as a plain change, so it leaves sealed under the key the owner holds.
            let mut header = self.engine.header(doc).map_err(doc_err)?.clone();
            header.key_epoch = epoch;
            let (_, out) = self
                .engine
                .transact(doc, now_ms(), None, |d, _, _| header.write(d))
                .map_err(doc_err)?;
            let batch = self.handle_outputs(out);
            return Ok((self.entity_view(doc)?, batch));
        }
        let update = EntityUpdate {
            state: write.state,
            attributes: write.attributes,
        };
        let (_, out) = self
            .engine
            .transact(doc, now_ms(), None, |d, at, by| {
                hearth_crdt::schema::entity::write(d, &update, at, by)
            })
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        Ok((self.entity_view(doc)?, batch))
    }
}

impl HookRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        matches!(self, Self::SetEntityUnchecked { .. })
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::SetEntityUnchecked { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::ClearRevocation { reply, .. }
            | Self::Capture { reply, .. }
            | Self::OpenFrame { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::SealSync { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::DocumentLoaded { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Sessions { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl Core {
    /// Answers a test hook's request.
    pub(crate) fn handle_hook(&mut self, request: HookRequest) {
        match request {
            HookRequest::Sessions { id, reply } => {
                let text = match self.doc_of_entity(&id) {
                    Some(doc) => {
                        let now = now_ms();
                        format!("now={now} {}", self.engine.debug_sessions_of(doc))
                    }
                    None => format!("{id}: no such entity"),
                };
                let _ = reply.send(Ok(text));
            }
            HookRequest::DocumentLoaded { id, reply } => {
                let loaded = self.doc_of_entity(&id).map(|d| self.engine.is_loaded(d));
                let _ = reply.send(Ok(loaded));
            }
            HookRequest::ClearRevocation { peer, reply } => {
                let result = self.debug_clear_revocation(&peer);
                let _ = reply.send(result);
            }
            HookRequest::SetEntityUnchecked {
                id,
                write,
                header_epoch,
                reply,
            } => {
                let result = self.debug_write_unchecked(&id, write, header_epoch);
                self.reply_after_flush(result, reply);
            }
            HookRequest::Capture { sink, reply } => {
                self.capture = Some(sink);
                let _ = reply.send(Ok(()));
            }
            HookRequest::OpenFrame { bytes, reply } => {
                let _ = reply.send(self.debug_open_frame(&bytes));
            }
            HookRequest::SealSync {
                entity,
                payload,
                reply,
            } => {
                let _ = reply.send(self.debug_seal_sync(&entity, payload));
            }
        }
    }
}
