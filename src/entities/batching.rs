//! The write batching window: local writes are committed at once, but their
//! store batches wait up to `Config::batch_window` for company and go to the store as one
//! batch, so a burst of writes costs one flush instead of one each. Every write in the
//! window is acknowledged after that flush, so an acknowledged write is still durable.
//!
//! The window's batch has its ticket from its first write (core/send_gate.rs): the pushes
//! of its writes leave once it is flushed, so no peer holds a change this device could
//! lose. Pushes that one core step produced for the same document and peer are merged into one frame
//! (a batch write of many updates to few entities becomes one sealed frame per entity).

use std::collections::HashSet;
use std::time::Duration;

use hearth_crdt::DocId;

use hearth_crdt::wire::{Frame, Push};
use hearth_storage::Batch;
use tokio::time::Instant;

use crate::Error;
use crate::core::durability::chunk_docs;
use crate::core::{Core, Reply, append};
use crate::entities::{Entity, EntityWrite};

/// Most writes acknowledged under one window; a full window is committed at once, which
/// bounds the memory a burst holds and the wait of the first writer.
pub(crate) const MAX_WINDOW_WRITES: usize = 1024;
/// Most writes in one `Entities::set_many` call.
pub const MAX_BATCH_WRITES: usize = 10_000;
/// Most pushes merged into one frame; each is at least one change, and a receiving engine
/// refuses pushes of more than `DEFAULT_MAX_CHANGES_PER_PUSH` (4096) changes.
const MAX_MERGED_PUSHES: usize = 1024;

/// What a flush acknowledges: called with the flush's outcome.
pub(crate) type Ack = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// Writes waiting for the window's flush.
pub(crate) struct WriteWindow {
    window: Duration,
    batch: Batch,
    acks: Vec<Ack>,
    deadline: Option<Instant>,
    /// The store ticket reserved for the window's batch, from its first write.
    ticket: Option<u64>,
    /// Documents the window's batch holds chunks of.
    docs: HashSet<DocId>,
}

impl WriteWindow {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            batch: Batch::new(),
            acks: Vec::new(),
            deadline: None,
            ticket: None,
            docs: HashSet::new(),
        }
    }

    /// When the open window closes, if one is open.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the window holds as many writes as it may.
    pub(crate) fn is_full(&self) -> bool {
        self.acks.len() >= MAX_WINDOW_WRITES
    }

    /// Adds a write; `ticket` reserves the batch's store ticket when the window opens.
    pub(crate) fn push(&mut self, batch: Batch, ack: Ack, ticket: impl FnOnce() -> u64) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.window);
        }
        if self.ticket.is_none() {
            self.ticket = Some(ticket());
        }
        self.docs.extend(chunk_docs(&batch));
        append(&mut self.batch, batch);
        self.acks.push(ack);
    }

    /// Whether the window holds chunks of a document that `batch` also has chunks of.
    pub(crate) fn shares_a_document(&self, batch: &Batch) -> bool {
        !self.docs.is_empty() && chunk_docs(batch).any(|doc| self.docs.contains(&doc))
    }

    pub(crate) fn take(&mut self) -> Option<(Batch, Vec<Ack>, Option<u64>)> {
        self.deadline = None;
        self.docs.clear();
        if self.acks.is_empty() {
            return None;
        }
        Some((
            std::mem::take(&mut self.batch),
            std::mem::take(&mut self.acks),
            self.ticket.take(),
        ))
    }
}

/// Runs each acknowledgement with the flush's outcome.
#[cfg(test)]
fn acknowledge(acks: Vec<Ack>, result: Result<(), hearth_storage::Error>) {
    for ack in acks {
        ack(result
            .as_ref()
            .map(|_| ())
            .map_err(crate::core::durability::write_error));
    }
}

impl Core {
    /// Answers a write that produced a store batch once the batch is flushed, without
    /// holding up the actor. With a window, the batch joins the open window and is
    /// flushed when it closes; without one it goes to the store at once (the storage
    /// thread still group-commits whatever is queued).
    pub(crate) fn reply_after_flush<T: Send + 'static>(
        &mut self,
        result: Result<(T, Batch), Error>,
        reply: Reply<T>,
    ) {
        let (value, batch) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let ack: Ack = Box::new(move |flushed| {
            let _ = reply.send(flushed.map(|()| value));
        });
        if self.entities.writes.window.is_zero() {
            self.queue_persist(batch, vec![ack]);
            return;
        }
        let tickets = &mut self.tickets;
        self.entities.writes.push(batch, ack, || tickets.issue());
        if self.entities.writes.is_full() {
            self.commit_window();
        }
    }

    /// Hands the open window's batch to the store; its writers are answered after the
    /// flush, without holding up the actor.
    pub(crate) fn commit_window(&mut self) {
        let Some((batch, acks, ticket)) = self.entities.writes.take() else {
            return;
        };
        match ticket {
            Some(ticket) => self.queue_ticketed(batch, acks, ticket),
            None => self.queue_persist(batch, acks),
        }
    }

    /// Commits the open window and starts every queued batch: the last step before the
    /// core stops. The node waits for them (every persist slot) before closing the store,
    /// so no acknowledged-to-be write is left unflushed.
    pub(crate) async fn commit_window_now(&mut self) {
        self.commit_window();
        self.start_persists().await;
    }

    /// Writes many entities in order as one step, acknowledged together after one flush.
    /// A write that fails stops the rest; the writes before it stay applied, and the
    /// error names the one that failed.
    pub(crate) fn set_many(
        &mut self,
        writes: Vec<(String, EntityWrite)>,
    ) -> Result<(Vec<Entity>, Batch), Error> {
        let mut batch = Batch::new();
        let mut entities = Vec::with_capacity(writes.len());
        let total = writes.len();
        for (i, (id, write)) in writes.into_iter().enumerate() {
            match self.set_entity(&id, write) {
                Ok((entity, more)) => {
                    append(&mut batch, more);
                    entities.push(entity);
                }
                Err(error) if i == 0 => return Err(error),
                Err(error) => {
                    // The earlier writes are committed and pushed; persist them before
                    // reporting, so what peers hold is also on disk here.
                    self.reply_after_flush(Ok(((), batch)), tokio::sync::oneshot::channel().0);
                    return Err(Error::Invalid(format!(
                        "write {} of {total} ({id}) failed, the {i} before it were applied: {error}",
                        i + 1
                    )));
                }
            }
        }
        Ok((entities, batch))
    }
}

/// Merges pushes bound for the same peer and document into one frame, so a step that
/// wrote one document many times sends it once. A push is merged only into an earlier
/// push of the same epoch and correlation id with no other frame for that document to
/// that peer between them, which keeps every document's frames in order.
pub(crate) fn coalesce_pushes(
    outbox: Vec<(String, Frame)>,
    max_bytes: usize,
) -> Vec<(String, Frame)> {
    use std::collections::HashMap;
    if outbox.len() < 2 {
        return outbox;
    }
    let mut out: Vec<(String, Frame)> = Vec::with_capacity(outbox.len());
    // (peer, doc) -> (index in `out` of the open push, pushes merged into it)
    let mut open: HashMap<(String, hearth_crdt::DocId), (usize, usize)> = HashMap::new();
    for (peer, frame) in outbox {
        match frame {
            Frame::Push(push) => {
                let key = (peer, push.doc);
                if let Some((at, merged)) = open.get_mut(&key)
                    && let Some((_, Frame::Push(into))) = out.get_mut(*at)
                    && mergeable(into, &push, *merged, max_bytes)
                {
                    into.bytes.extend_from_slice(&push.bytes);
                    *merged += 1;
                    continue;
                }
                open.insert(key.clone(), (out.len(), 1));
                out.push((key.0, Frame::Push(push)));
            }
            other => {
                if let Some(doc) = frame_doc(&other) {
                    open.remove(&(peer.clone(), doc));
                }
                out.push((peer, other));
            }
        }
    }
    out
}

fn mergeable(into: &Push, next: &Push, merged: usize, max_bytes: usize) -> bool {
    into.epoch == next.epoch
        && into.correlation_id == next.correlation_id
        && merged < MAX_MERGED_PUSHES
        && into.bytes.len() + next.bytes.len() <= max_bytes
}

fn frame_doc(frame: &Frame) -> Option<hearth_crdt::DocId> {
    match frame {
        Frame::Push(p) => Some(p.doc),
        Frame::Sync(s) => Some(s.doc),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_crdt::{DocId, KeyEpoch};

    pub(crate) fn push(doc: u8, bytes: &[u8], corr: Option<&str>) -> Frame {
        Frame::Push(Push {
            doc: DocId::from_bytes([doc; 16]),
            epoch: KeyEpoch::first([0; 16]),
            correlation_id: corr.map(str::to_string),
            bytes: bytes.to_vec(),
        })
    }

    pub(crate) fn bytes_of(frame: &Frame) -> &[u8] {
        match frame {
            Frame::Push(p) => &p.bytes,
            _ => panic!("not a push"),
        }
    }

    #[test]
    pub(crate) fn pushes_to_one_peer_and_document_become_one_frame_in_order() {
        let outbox = vec![
            ("p".to_string(), push(1, b"a", None)),
            ("p".to_string(), push(2, b"x", None)),
            ("q".to_string(), push(1, b"a", None)),
            ("p".to_string(), push(1, b"b", None)),
            ("p".to_string(), push(1, b"c", None)),
        ];
        let out = coalesce_pushes(outbox, 1024);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].0, "p");
        assert_eq!(bytes_of(&out[0].1), b"abc");
        assert_eq!(bytes_of(&out[1].1), b"x");
        assert_eq!(out[2].0, "q");
        assert_eq!(bytes_of(&out[2].1), b"a");
    }

    #[test]
    pub(crate) fn different_correlation_ids_and_size_cap_keep_pushes_apart() {
        let outbox = vec![
            ("p".to_string(), push(1, b"aa", Some("one"))),
            ("p".to_string(), push(1, b"bb", Some("two"))),
            ("p".to_string(), push(1, b"cc", Some("two"))),
            ("p".to_string(), push(1, b"dd", Some("two"))),
        ];
        let out = coalesce_pushes(outbox, 4);
        let parts: Vec<&[u8]> = out.iter().map(|(_, f)| bytes_of(f)).collect();
        assert_eq!(parts, vec![&b"aa"[..], b"bbcc", b"dd"]);
    }

    #[test]
    pub(crate) fn window_takes_everything_once_and_closes() {
        let mut w = WriteWindow::new(Duration::from_millis(1));
        assert!(w.deadline().is_none());
        let (tx, mut rx) = tokio::sync::oneshot::channel::<Result<(), Error>>();
        w.push(
            Batch::new(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
            || 7,
        );
        // Later writes keep the ticket the window reserved with its first.
        w.push(Batch::new(), Box::new(|_| {}), || 8);
        assert!(w.deadline().is_some());
        let (_, acks, ticket) = w.take().expect("two writes wait");
        assert_eq!(ticket, Some(7));
        assert!(w.deadline().is_none() && w.take().is_none());
        acknowledge(acks, Ok(()));
        assert!(matches!(rx.try_recv(), Ok(Ok(()))));
    }
}
