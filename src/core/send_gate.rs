//! Frames wait for the store. A change this device wrote must be on its disk before any
//! peer can hold it: a device killed between sending a change and flushing it would
//! otherwise come back without it and write a different change under the same actor and
//! sequence number, which its peers refuse for good (Automerge's duplicate sequence
//! number), so that document would stop syncing from it.
//!
//! Every store batch the core starts in the background gets a ticket, in order (the open
//! write window reserves its ticket with its first write). Frames leave in the order they
//! were queued, each once every batch ticketed before it was queued has finished, so a
//! frame never carries a change that is not yet durable here. A batch that failed counts
//! as finished: the store's failure handling (durability.rs) stores it again once the
//! store is back, and holding every frame meanwhile would stop sync altogether.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use hearth_crdt::wire::Frame;
use tokio::sync::watch;

/// Most frames held for the store before the core stops taking more work and waits for
/// its batches: one slow batch must not let them pile up without bound.
pub(crate) const MAX_HELD_FRAMES: usize = 16_384;

/// Tickets of background store batches, and how far they have finished.
pub(crate) struct Tickets {
    issued: u64,
    finished: Arc<Mutex<Watermark>>,
    through: watch::Receiver<u64>,
}

/// The highest ticket below which every batch finished, and those finished above it.
pub(crate) struct Watermark {
    through: u64,
    ahead: BTreeSet<u64>,
    tx: watch::Sender<u64>,
}

/// What a persist task calls once its batch finished, flushed or failed.
#[derive(Clone)]
pub(crate) struct Finish(Arc<Mutex<Watermark>>);

/// Finishes its ticket when dropped.
pub(crate) struct FinishOnDrop {
    finish: Finish,
    ticket: u64,
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.finish.finished(self.ticket);
    }
}

impl Finish {
    /// A guard that finishes `ticket` when dropped, also while unwinding.
    pub(crate) fn on_drop(&self, ticket: u64) -> FinishOnDrop {
        FinishOnDrop {
            finish: self.clone(),
            ticket,
        }
    }

    pub(crate) fn finished(&self, ticket: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finish(ticket);
    }
}

impl Watermark {
    fn finish(&mut self, ticket: u64) {
        if ticket <= self.through {
            return;
        }
        self.ahead.insert(ticket);
        let before = self.through;
        while self.ahead.remove(&(self.through + 1)) {
            self.through += 1;
        }
        if self.through != before {
            self.tx.send_replace(self.through);
        }
    }
}

impl Tickets {
    pub(crate) fn new() -> Self {
        let (tx, through) = watch::channel(0);
        Self {
            issued: 0,
            finished: Arc::new(Mutex::new(Watermark {
                through: 0,
                ahead: BTreeSet::new(),
                tx,
            })),
            through,
        }
    }

    /// The next batch's ticket.
    pub(crate) fn issue(&mut self) -> u64 {
        self.issued += 1;
        self.issued
    }

    /// The last ticket issued: what a frame queued now waits for.
    pub(crate) fn last_issued(&self) -> u64 {
        self.issued
    }

    /// Every batch up to this ticket has finished.
    pub(crate) fn finished_through(&self) -> u64 {
        *self.through.borrow()
    }

    /// For the persist tasks.
    pub(crate) fn finish(&self) -> Finish {
        Finish(self.finished.clone())
    }

    /// Changes whenever more batches have finished, for the run loop to send what waited.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.through.clone()
    }
}

/// Frames waiting for their batches, in the order they were queued.
#[derive(Default)]
pub(crate) struct SendGate {
    held: VecDeque<(u64, String, Frame)>,
}

impl SendGate {
    /// Queues `frames`, each to leave once every batch up to `needs` has finished.
    pub(crate) fn hold(&mut self, needs: u64, frames: Vec<(String, Frame)>) {
        self.held
            .extend(frames.into_iter().map(|(peer, frame)| (needs, peer, frame)));
    }

    /// The frames that may leave now that every batch up to `through` has finished: those
    /// at the front of the queue whose batches have, in order.
    pub(crate) fn release(&mut self, through: u64) -> Vec<(String, Frame)> {
        let ready = self
            .held
            .iter()
            .take_while(|(needs, _, _)| *needs <= through)
            .count();
        self.held
            .drain(..ready)
            .map(|(_, peer, frame)| (peer, frame))
            .collect()
    }

    /// Frames still waiting.
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_crdt::wire::DigestFrame;

    fn frame(n: u8) -> (String, Frame) {
        (
            format!("peer{n}"),
            Frame::Digest(DigestFrame { bytes: vec![n] }),
        )
    }

    #[test]
    fn the_watermark_moves_only_over_batches_that_all_finished() {
        let mut tickets = Tickets::new();
        let (a, b, c) = (tickets.issue(), tickets.issue(), tickets.issue());
        let finish = tickets.finish();
        finish.finished(b);
        finish.finished(c);
        assert_eq!(
            tickets.finished_through(),
            0,
            "the first batch is still out"
        );
        finish.finished(a);
        assert_eq!(tickets.finished_through(), c);
        finish.finished(a);
        assert_eq!(tickets.finished_through(), c, "a repeat changes nothing");
        assert_eq!(tickets.last_issued(), c);
        let d = tickets.issue();
        // A guard finishes its ticket even when the task holding it panics.
        let guard = finish.on_drop(d);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = guard;
            panic!("the store client panicked");
        }));
        assert_eq!(tickets.finished_through(), d);
    }

    #[test]
    fn frames_leave_in_order_once_the_batches_before_them_finished() {
        let mut gate = SendGate::default();
        gate.hold(0, vec![frame(1)]);
        gate.hold(2, vec![frame(2), frame(3)]);
        gate.hold(1, vec![frame(4)]);
        assert_eq!(gate.release(0), vec![frame(1)]);
        // The frame that needs only batch 1 waits behind those that need batch 2.
        assert!(gate.release(1).is_empty());
        assert_eq!(gate.len(), 3);
        assert_eq!(gate.release(2), vec![frame(2), frame(3), frame(4)]);
        assert_eq!(gate.len(), 0);
    }
}
