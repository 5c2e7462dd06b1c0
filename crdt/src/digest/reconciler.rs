//! One side of a digest session: the turn-taking state machine that finds the documents that
//! differ between two peers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::error::Error;
use crate::ids::DocId;

use super::tree::{DigestTree, FANOUT, Hash, LEAF_MAX, MAX_DEPTH, NibblePath, presence_bits};
use super::wire::{
    DigestMessage, Item, MAX_ITEMS_PER_MESSAGE, MAX_VALUES_PER_MESSAGE, PROTOCOL_VERSION, Wire,
    WireEntry, WireHash, WireId,
};

/// The documents that differ between the two sides, seen from the local side. Both sides of a
/// session report the same ids, with `local_only` and `remote_only` swapped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Differences {
    /// Documents this side holds and the peer lacks.
    pub local_only: BTreeSet<DocId>,
    /// Documents the peer says it holds and this side lacks. These are the peer's claims: check
    /// that the peer may share a document before syncing it.
    pub remote_only: BTreeSet<DocId>,
    /// Documents both sides hold, with different heads.
    pub changed: BTreeSet<DocId>,
}

impl Differences {
    /// Every differing document, whichever side holds it.
    pub fn all(&self) -> BTreeSet<DocId> {
        self.local_only
            .iter()
            .chain(&self.remote_only)
            .chain(&self.changed)
            .copied()
            .collect()
    }

    /// Number of differing documents.
    pub fn len(&self) -> usize {
        self.local_only.len() + self.remote_only.len() + self.changed.len()
    }

    /// Whether the two sides hold the same documents with the same heads.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Traffic of one session, as counted by one side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DigestStats {
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Hashes sent: root and child hashes, plus one per listed entry.
    pub hashes_sent: u64,
    /// Hashes received, counted the same way.
    pub hashes_received: u64,
    /// CBOR bytes sent.
    pub bytes_sent: u64,
    /// CBOR bytes received.
    pub bytes_received: u64,
}

/// What [`Reconciler::handle`] produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Messages to send to the peer, in order; empty while the peer's turn is still arriving.
    pub send: Vec<DigestMessage>,
    /// Set once, when the session has finished (after `send` has gone out): every document that
    /// differs. Hand these to the per-document sync sessions.
    pub finished: Option<Differences>,
}

/// A question this side asked in its last turn, awaiting the peer's answer.
#[derive(Debug)]
enum Question {
    /// `Start`: answered by the peer's `Children` or `Entries` at the root, or by nothing when the
    /// roots are equal.
    Root { answered: bool },
    /// `Children`: each differing child is answered at most once, by `Children` or `Entries`.
    Children { answered: u16 },
    /// `Entries`: must be answered exactly once, by `Settle` or by `Children` at the same path.
    Entries {
        sent: Vec<(DocId, Hash)>,
        answered: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Fresh,
    Waiting,
    Finished,
    Failed,
}

/// One side of a digest session with one peer; see the [module docs](super) for the protocol.
///
/// Sans-IO: [`start`](Self::start) and [`handle`](Self::handle) take the local tree and return the
/// messages to send. Pass the same tree (or an up-to-date version of it) on every call. Documents
/// that change during the session may or may not be reported; they travel by live push anyway.
/// A session that hears nothing for a while should be dropped by the node's own timer.
#[derive(Debug)]
pub struct Reconciler {
    phase: Phase,
    session: u64,
    /// Questions of our last turn, which the peer's current turn answers.
    pending: BTreeMap<NibblePath, Question>,
    /// Questions of the turn we are composing.
    next_pending: BTreeMap<NibblePath, Question>,
    /// Items of the turn we are composing.
    outbox: Vec<Item>,
    /// Questions seen in the peer's current turn.
    turn_questions: usize,
    diff: Differences,
    stats: DigestStats,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconciler {
    /// A fresh session: call [`start`](Self::start) to initiate, or pass the peer's `Start` to
    /// [`handle`](Self::handle) to respond.
    pub fn new() -> Self {
        Self {
            phase: Phase::Fresh,
            session: 0,
            pending: BTreeMap::new(),
            next_pending: BTreeMap::new(),
            outbox: Vec::new(),
            turn_questions: 0,
            diff: Differences::default(),
            stats: DigestStats::default(),
        }
    }

    /// Opens a session as the initiator. `session` should be random (the caller supplies
    /// randomness), so that stray messages of an earlier session are refused.
    pub fn start(&mut self, session: u64, tree: &DigestTree) -> Result<DigestMessage, Error> {
        if self.phase != Phase::Fresh {
            return Err(Error::Wire(format!(
                "digest session {:016x} has already begun; start a new one instead",
                self.session
            )));
        }
        self.session = session;
        self.phase = Phase::Waiting;
        self.pending
            .insert(NibblePath::ROOT, Question::Root { answered: false });
        let message = DigestMessage(Wire::Start(
            PROTOCOL_VERSION,
            session,
            tree.root_hash().map(WireHash),
        ));
        self.count_sent(&message);
        Ok(message)
    }

    /// The session id; 0 until the session begins.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Whether the session has finished.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Whether the session failed; it then refuses every further message.
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// Traffic so far.
    pub fn stats(&self) -> DigestStats {
        self.stats
    }

    /// Handles one message from the peer. Returns the messages to send (once the peer's turn is
    /// complete) and, at the end, the differing documents.
    ///
    /// A message of another session is refused with an error and leaves this session untouched.
    /// Any other invalid message fails the session: the error says why, and every later call
    /// returns an error too. Nothing here panics on peer input.
    pub fn handle(&mut self, tree: &DigestTree, message: DigestMessage) -> Result<Progress, Error> {
        match self.phase {
            Phase::Failed => {
                return Err(self.violation("the session has already failed"));
            }
            Phase::Finished => {
                return Err(self.violation("the session has already finished"));
            }
            Phase::Fresh if !message.is_start() => {
                return Err(Error::Wire(format!(
                    "digest message for session {:016x} reached a session that has not begun",
                    message.session()
                )));
            }
            Phase::Waiting if message.session() != self.session => {
                return Err(Error::Wire(format!(
                    "digest message for session {:016x} reached session {:016x}; ignored",
                    message.session(),
                    self.session
                )));
            }
            _ => {}
        }
        self.stats.messages_received += 1;
        self.stats.hashes_received += message.hash_count() as u64;
        self.stats.bytes_received += message.encoded_len() as u64;
        let result = match message.0 {
            Wire::Start(version, session, root) => self.on_start(tree, version, session, root),
            Wire::Step(_, end_of_turn, items) => self.on_step(tree, end_of_turn, items),
        };
        if result.is_err() {
            self.phase = Phase::Failed;
            self.pending.clear();
            self.next_pending.clear();
            self.outbox.clear();
        }
        result
    }

    fn violation(&self, reason: impl fmt::Display) -> Error {
        Error::Wire(format!("digest session {:016x}: {reason}", self.session))
    }

    fn on_start(
        &mut self,
        tree: &DigestTree,
        version: u8,
        session: u64,
        root: Option<WireHash>,
    ) -> Result<Progress, Error> {
        if self.phase != Phase::Fresh {
            return Err(self.violation("a second start arrived; only one side initiates"));
        }
        self.session = session;
        if version != PROTOCOL_VERSION {
            return Err(Error::WireVersion {
                found: version,
                supported: PROTOCOL_VERSION,
            });
        }
        self.phase = Phase::Waiting;
        self.turn_questions = 1;
        if root.map(|h| h.0) != tree.root_hash() {
            self.expand(tree, NibblePath::ROOT)?;
        }
        self.end_turn()
    }

    fn on_step(
        &mut self,
        tree: &DigestTree,
        end_of_turn: bool,
        items: Vec<Item>,
    ) -> Result<Progress, Error> {
        if items.len() > MAX_ITEMS_PER_MESSAGE {
            return Err(self.violation(format_args!(
                "{} items in one message, over the cap of {MAX_ITEMS_PER_MESSAGE}",
                items.len()
            )));
        }
        let weight: usize = items.iter().map(Item::weight).sum();
        if weight > MAX_VALUES_PER_MESSAGE {
            return Err(self.violation(format_args!(
                "{weight} values in one message, over the cap of {MAX_VALUES_PER_MESSAGE}"
            )));
        }
        if items.is_empty() && !end_of_turn {
            // Only the last message of a turn may be empty; otherwise a peer could stretch a turn
            // forever at no cost to itself.
            return Err(self.violation("an empty message that does not end its turn"));
        }
        for item in items {
            self.on_item(tree, item)?;
        }
        if end_of_turn {
            self.end_turn()
        } else {
            Ok(Progress::default())
        }
    }

    fn on_item(&mut self, tree: &DigestTree, item: Item) -> Result<(), Error> {
        let path = item.path();
        match item {
            Item::Children(_, present, hashes) => {
                if path.len() >= MAX_DEPTH {
                    return Err(
                        self.violation(format_args!("children at {path}, which is a whole doc id"))
                    );
                }
                if present == 0 || hashes.len() != present.count_ones() as usize {
                    return Err(self.violation(format_args!(
                        "children at {path}: bitmap {present:#06x} does not match {} hashes",
                        hashes.len()
                    )));
                }
                self.accept_question(path, true)?;
                let mut theirs = [None; FANOUT];
                let mut given = hashes.into_iter();
                for (i, slot) in theirs.iter_mut().enumerate() {
                    if present & (1 << i) != 0 {
                        *slot = given.next().map(|h| h.0);
                    }
                }
                let ours = tree.child_hashes(&path);
                for nibble in 0..FANOUT as u8 {
                    let i = usize::from(nibble);
                    if theirs[i] != ours[i]
                        && let Some(child) = path.child(nibble)
                    {
                        self.expand(tree, child)?;
                    }
                }
                Ok(())
            }
            Item::Entries(_, entries) => {
                if entries.len() > LEAF_MAX {
                    return Err(self.violation(format_args!(
                        "{} entries at {path}, over the leaf cap of {LEAF_MAX}",
                        entries.len()
                    )));
                }
                if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
                    return Err(
                        self.violation(format_args!("entries at {path} are not sorted and unique"))
                    );
                }
                if let Some(stray) = entries.iter().find(|e| !path.contains(&e.0)) {
                    return Err(
                        self.violation(format_args!("entry {} lies outside {path}", stray.0))
                    );
                }
                self.accept_question(path, false)?;
                if tree.count_under(&path) > LEAF_MAX && path.len() < MAX_DEPTH {
                    // We hold more than a leaf here: answer with our children rather than listing
                    // a subtree of any size in one item.
                    self.ask_children(tree, path)
                } else {
                    self.settle(tree, path, &entries)
                }
            }
            Item::Settle(_, only_yours, only_mine, changed) => {
                self.on_settle(path, &only_yours, &only_mine, &changed)
            }
        }
    }

    /// Checks that a question from the peer answers one of ours, and marks that one answered.
    /// `children` tells whether the question is `Children` (else `Entries`).
    fn accept_question(&mut self, path: NibblePath, children: bool) -> Result<(), Error> {
        self.turn_questions += 1;
        let session = self.session;
        let refuse = |reason: &str| {
            Error::Wire(format!("digest session {session:016x}: {reason} at {path}"))
        };
        if let Some(question) = self.pending.get_mut(&path) {
            return match question {
                Question::Root { answered } if !*answered => {
                    *answered = true;
                    Ok(())
                }
                Question::Entries { answered, .. } if !*answered && children => {
                    *answered = true;
                    Ok(())
                }
                _ => Err(refuse("an answer that does not fit the question asked")),
            };
        }
        let parent = path.parent().zip(path.nibble(path.len().wrapping_sub(1)));
        if let Some((parent, nibble)) = parent
            && let Some(Question::Children { answered }) = self.pending.get_mut(&parent)
        {
            let bit = 1u16 << nibble;
            if *answered & bit != 0 {
                return Err(refuse("a second answer"));
            }
            *answered |= bit;
            return Ok(());
        }
        Err(refuse("an answer to no question"))
    }

    fn on_settle(
        &mut self,
        path: NibblePath,
        only_yours: &[WireId],
        only_mine: &[WireId],
        changed: &[WireId],
    ) -> Result<(), Error> {
        let session = self.session;
        let refuse = |reason: &str| {
            Error::Wire(format!(
                "digest session {session:016x}: settle at {path}: {reason}"
            ))
        };
        let Some(Question::Entries { sent, answered }) = self.pending.get_mut(&path) else {
            return Err(refuse("it answers no entries we sent"));
        };
        if *answered {
            return Err(refuse("a second answer"));
        }
        for list in [only_yours, only_mine, changed] {
            if list.len() > LEAF_MAX {
                return Err(refuse("a list longer than a leaf"));
            }
            if !list.windows(2).all(|w| w[0].0 < w[1].0) {
                return Err(refuse("a list that is not sorted and unique"));
            }
        }
        let was_sent = |id: &DocId| sent.binary_search_by(|(s, _)| s.cmp(id)).is_ok();
        if !only_yours.iter().chain(changed).all(|w| was_sent(&w.0)) {
            return Err(refuse("it names ids we did not list"));
        }
        if only_yours.iter().any(|w| changed.contains(w)) {
            return Err(refuse("an id both missing and changed"));
        }
        if !only_mine
            .iter()
            .all(|w| path.contains(&w.0) && !was_sent(&w.0))
        {
            return Err(refuse("it claims ids outside the path or ids we listed"));
        }
        *answered = true;
        // The settle is written from the peer's side: its "yours" is our side.
        self.diff.local_only.extend(only_yours.iter().map(|w| w.0));
        self.diff.remote_only.extend(only_mine.iter().map(|w| w.0));
        self.diff.changed.extend(changed.iter().map(|w| w.0));
        Ok(())
    }

    /// Queues our view of `path` as a question: children when we hold more than a leaf there,
    /// else our entries (possibly none).
    fn expand(&mut self, tree: &DigestTree, path: NibblePath) -> Result<(), Error> {
        if tree.count_under(&path) > LEAF_MAX && path.len() < MAX_DEPTH {
            return self.ask_children(tree, path);
        }
        let sent: Vec<(DocId, Hash)> = tree.entries_under(&path).collect();
        self.outbox.push(Item::Entries(
            path,
            sent.iter().map(|(id, h)| WireEntry(*id, *h)).collect(),
        ));
        self.add_question(
            path,
            Question::Entries {
                sent,
                answered: false,
            },
        )
    }

    fn ask_children(&mut self, tree: &DigestTree, path: NibblePath) -> Result<(), Error> {
        let hashes = tree.child_hashes(&path);
        let present = presence_bits(&hashes);
        self.outbox.push(Item::Children(
            path,
            present,
            hashes.iter().flatten().map(|h| WireHash(*h)).collect(),
        ));
        self.add_question(path, Question::Children { answered: 0 })
    }

    fn add_question(&mut self, path: NibblePath, question: Question) -> Result<(), Error> {
        // Accepted answers form an antichain of paths, so this cannot repeat; refuse rather than
        // trust that if the peer finds a way.
        if self.next_pending.insert(path, question).is_some() {
            return Err(self.violation(format_args!("two questions at {path}")));
        }
        Ok(())
    }

    /// Both sides hold at most a leaf under `path`: compare the lists, record the differences and
    /// tell the peer.
    fn settle(
        &mut self,
        tree: &DigestTree,
        path: NibblePath,
        theirs: &[WireEntry],
    ) -> Result<(), Error> {
        let ours: Vec<(DocId, Hash)> = tree.entries_under(&path).collect();
        let (mut only_theirs, mut only_ours, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        // Merge-join of two sorted lists.
        loop {
            match (theirs.get(i), ours.get(j)) {
                (Some(t), Some(o)) if t.0 == o.0 => {
                    if t.1 != o.1 {
                        changed.push(WireId(t.0));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(t), Some(o)) if t.0 < o.0 => {
                    only_theirs.push(WireId(t.0));
                    i += 1;
                }
                (Some(t), None) => {
                    only_theirs.push(WireId(t.0));
                    i += 1;
                }
                (_, Some(o)) => {
                    only_ours.push(WireId(o.0));
                    j += 1;
                }
                (None, None) => break,
            }
        }
        self.diff
            .remote_only
            .extend(only_theirs.iter().map(|w| w.0));
        self.diff.local_only.extend(only_ours.iter().map(|w| w.0));
        self.diff.changed.extend(changed.iter().map(|w| w.0));
        self.outbox
            .push(Item::Settle(path, only_theirs, only_ours, changed));
        Ok(())
    }

    /// The peer's turn is complete: check it answered what it had to, then send our turn.
    fn end_turn(&mut self) -> Result<Progress, Error> {
        if let Some(path) = self
            .pending
            .iter()
            .find(|(_, q)| {
                matches!(
                    q,
                    Question::Entries {
                        answered: false,
                        ..
                    }
                )
            })
            .map(|(p, _)| *p)
        {
            return Err(self.violation(format_args!(
                "the entries we sent at {path} went unanswered"
            )));
        }
        self.pending = std::mem::take(&mut self.next_pending);
        let asked = std::mem::take(&mut self.turn_questions);
        let send = if asked == 0 {
            // The peer asked nothing: it has finished, and so have we.
            Vec::new()
        } else {
            self.flush()
        };
        let finished = self.pending.is_empty().then(|| {
            self.phase = Phase::Finished;
            self.diff.clone()
        });
        Ok(Progress { send, finished })
    }

    /// Packs the outbox into messages within the caps; the last one ends our turn. An empty
    /// outbox still yields one (empty) message, which tells the peer its questions found nothing.
    fn flush(&mut self) -> Vec<DigestMessage> {
        let mut messages = Vec::new();
        let mut items = Vec::new();
        let mut weight = 0;
        for item in std::mem::take(&mut self.outbox) {
            let w = item.weight();
            if !items.is_empty()
                && (items.len() == MAX_ITEMS_PER_MESSAGE || weight + w > MAX_VALUES_PER_MESSAGE)
            {
                messages.push(DigestMessage(Wire::Step(
                    self.session,
                    false,
                    std::mem::take(&mut items),
                )));
                weight = 0;
            }
            weight += w;
            items.push(item);
        }
        messages.push(DigestMessage(Wire::Step(self.session, true, items)));
        for message in &messages {
            self.count_sent(message);
        }
        messages
    }

    fn count_sent(&mut self, message: &DigestMessage) {
        self.stats.messages_sent += 1;
        self.stats.hashes_sent += message.hash_count() as u64;
        self.stats.bytes_sent += message.encoded_len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::MAX_MESSAGE_BYTES;
    use crate::digest::testing::{heads, id, reconcile, tree_of};
    use crate::ids::DOC_ID_LEN;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The true differences between two maps, from `a`'s side.
    fn truth(a: &BTreeMap<DocId, Hash>, b: &BTreeMap<DocId, Hash>) -> Differences {
        let mut d = Differences::default();
        for (k, v) in a {
            match b.get(k) {
                None => {
                    d.local_only.insert(*k);
                }
                Some(w) if w != v => {
                    d.changed.insert(*k);
                }
                Some(_) => {}
            }
        }
        d.remote_only = b.keys().filter(|k| !a.contains_key(k)).copied().collect();
        d
    }

    fn mirrored(d: &Differences) -> Differences {
        Differences {
            local_only: d.remote_only.clone(),
            remote_only: d.local_only.clone(),
            changed: d.changed.clone(),
        }
    }

    #[test]
    fn ten_changed_of_a_thousand_costs_log_d_hashes_each() {
        let a: BTreeMap<DocId, Hash> = (0..1000).map(|n| (id(n), heads(n))).collect();
        let mut b = a.clone();
        for n in (0..1000).step_by(100) {
            b.insert(id(n), heads(n + 5000));
        }
        let run = reconcile(&tree_of(&a), &tree_of(&b));
        assert_eq!(run.a.len(), 10);
        assert_eq!(run.a, truth(&a, &b));
        assert_eq!(run.b, mirrored(&run.a));
        let bound = 10.0 * 16.0 * 1000f64.log(16.0) + 16.0;
        let hashes = run.hashes();
        assert!((hashes as f64) < bound, "{hashes} hashes, bound {bound:.0}");
        // Far below what listing every document would cost.
        assert!(hashes < 1000 / 2, "{hashes} hashes");
    }

    #[test]
    fn no_change_is_one_round_trip() {
        let tree: DigestTree = (0..1000).map(|n| (id(n), heads(n))).collect();
        let run = reconcile(&tree, &tree.clone());
        assert!(run.a.is_empty() && run.b.is_empty());
        assert_eq!(
            (run.a_stats.messages_sent, run.a_stats.messages_received),
            (1, 1)
        );
        assert_eq!(
            (run.b_stats.messages_sent, run.b_stats.messages_received),
            (1, 1)
        );
        assert_eq!(run.hashes(), 1, "only the initiator's root hash travels");
        assert!(run.a_stats.bytes_sent + run.b_stats.bytes_sent < 100);
        assert_eq!(run.a_stats.bytes_sent, run.b_stats.bytes_received);
        // Two empty peers agree just as quickly.
        let empty = reconcile(&DigestTree::new(), &DigestTree::new());
        assert_eq!(empty.a_stats.messages_sent + empty.b_stats.messages_sent, 2);
    }

    #[test]
    fn documents_missing_on_either_side_are_found() {
        let shared: BTreeMap<DocId, Hash> = (0..600).map(|n| (id(n), heads(n))).collect();
        let mut a = shared.clone();
        let mut b = shared;
        for n in 600..610 {
            a.insert(id(n), heads(n));
        }
        for n in 700..705 {
            b.insert(id(n), heads(n));
        }
        b.insert(id(3), heads(3333));
        let run = reconcile(&tree_of(&a), &tree_of(&b));
        assert_eq!(run.a.local_only, (600..610).map(id).collect());
        assert_eq!(run.a.remote_only, (700..705).map(id).collect());
        assert_eq!(run.a.changed, [id(3)].into_iter().collect());
        assert_eq!(run.b, mirrored(&run.a));
    }

    #[test]
    fn an_empty_peer_learns_everything_in_capped_messages() {
        let a: BTreeMap<DocId, Hash> = (0..5000).map(|n| (id(n), heads(n))).collect();
        let run = reconcile(&tree_of(&a), &DigestTree::new());
        assert_eq!(run.a.local_only.len(), 5000);
        assert_eq!(run.b.remote_only.len(), 5000);
        // The last turns hold thousands of ids, so they must have been split.
        assert!(run.a_stats.messages_sent + run.b_stats.messages_sent > 10);
        let run = reconcile(&DigestTree::new(), &tree_of(&a));
        assert_eq!(run.a.remote_only.len(), 5000);
    }

    #[test]
    fn deep_shared_prefixes_are_reconciled() {
        // Ids that agree on their first 15 bytes force the tree to its full depth.
        let deep = |n: u8| {
            let mut bytes = [0x42u8; DOC_ID_LEN];
            bytes[15] = n;
            DocId::from_bytes(bytes)
        };
        let a: BTreeMap<DocId, Hash> = (0..=255u8).map(|n| (deep(n), heads(n.into()))).collect();
        let mut b = a.clone();
        b.remove(&deep(17));
        b.insert(deep(200), heads(1));
        let run = reconcile(&tree_of(&a), &tree_of(&b));
        assert_eq!(run.a, truth(&a, &b));
        assert_eq!(run.a.len(), 2);
    }

    /// A session mid-way: `a` started, `b` answered, and `a` holds `b`'s first reply.
    fn mid_session() -> (Reconciler, DigestTree, Vec<DigestMessage>) {
        let a_tree: DigestTree = (0..300).map(|n| (id(n), heads(n))).collect();
        let mut b_tree = a_tree.clone();
        b_tree.insert(id(5), heads(55));
        let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
        let start = a.start(9, &a_tree).unwrap();
        let reply = b.handle(&b_tree, start).unwrap().send;
        (a, a_tree, reply)
    }

    #[test]
    fn a_message_of_another_session_is_refused_without_harm() {
        let (mut a, tree, reply) = mid_session();
        let mut stray = reply[0].clone();
        if let Wire::Step(session, ..) = &mut stray.0 {
            *session = 10;
        }
        assert!(a.handle(&tree, stray).is_err());
        assert!(!a.is_failed());
        for m in reply {
            a.handle(&tree, m).unwrap();
        }
    }

    #[test]
    fn protocol_violations_fail_the_session() {
        let cases: Vec<(&str, Wire)> = vec![
            ("second start", Wire::Start(PROTOCOL_VERSION, 9, None)),
            (
                "unasked path",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Entries(
                        NibblePath::from_nibbles(&[1, 2]).unwrap(),
                        vec![],
                    )],
                ),
            ),
            (
                "settle nobody asked for",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Settle(NibblePath::ROOT, vec![], vec![], vec![])],
                ),
            ),
            (
                "bitmap mismatch",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Children(
                        NibblePath::ROOT,
                        0b11,
                        vec![WireHash([1; 32])],
                    )],
                ),
            ),
            (
                "too many items",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Entries(NibblePath::ROOT, vec![]); MAX_ITEMS_PER_MESSAGE + 1],
                ),
            ),
            (
                "too many entries",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Entries(
                        NibblePath::ROOT,
                        (0..=LEAF_MAX as u64)
                            .map(|n| WireEntry(id(n), [0; 32]))
                            .collect(),
                    )],
                ),
            ),
            ("empty non-final message", Wire::Step(9, false, vec![])),
        ];
        for (what, wire) in cases {
            let (mut a, tree, reply) = mid_session();
            assert!(
                a.handle(&tree, DigestMessage(wire)).is_err(),
                "{what} accepted"
            );
            assert!(a.is_failed(), "{what} did not fail the session");
            assert!(
                a.handle(&tree, reply[0].clone()).is_err(),
                "{what}: failed session went on"
            );
        }
    }

    #[test]
    fn start_and_version_misuse_are_errors() {
        let tree: DigestTree = (0..10).map(|n| (id(n), heads(n))).collect();
        let mut a = Reconciler::new();
        let start = a.start(1, &tree).unwrap();
        assert!(a.start(2, &tree).is_err());
        // Both sides initiating: the second start is refused.
        assert!(a.handle(&tree, start.clone()).is_err());
        let mut b = Reconciler::new();
        let old = DigestMessage(Wire::Start(PROTOCOL_VERSION + 1, 1, None));
        assert!(matches!(
            b.handle(&tree, old),
            Err(Error::WireVersion { .. })
        ));
        let mut c = Reconciler::new();
        let step = DigestMessage(Wire::Step(1, true, vec![]));
        assert!(c.handle(&tree, step).is_err());
        assert!(!c.is_failed(), "a fresh session ignores strays");
        // After the end, nothing more is accepted.
        let mut d = Reconciler::new();
        let done = d.handle(&tree, start).unwrap();
        assert!(done.finished.is_some());
        assert!(d.handle(&tree, done.send[0].clone()).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Change(usize),
        Remove(usize),
        Insert(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                any::<usize>().prop_map(Op::Change),
                any::<usize>().prop_map(Op::Remove),
                any::<u64>().prop_map(Op::Insert),
            ],
            0..40,
        )
    }

    /// Applies `ops` to both a model map and a tree, incrementally.
    fn apply(
        ops: &[Op],
        model: &mut BTreeMap<DocId, Hash>,
        tree: &mut DigestTree,
        make: impl Fn(u64) -> DocId,
    ) {
        for (step, op) in ops.iter().enumerate() {
            let pick = |i: usize| model.keys().nth(i % model.len().max(1)).copied();
            match *op {
                Op::Change(i) => {
                    if let Some(k) = pick(i) {
                        let h = heads(1_000_000 + step as u64);
                        model.insert(k, h);
                        tree.insert(k, h);
                    }
                }
                Op::Remove(i) => {
                    if let Some(k) = pick(i) {
                        model.remove(&k);
                        assert!(tree.remove(&k).is_some());
                    }
                }
                Op::Insert(n) => {
                    let k = make(n);
                    model.insert(k, heads(n));
                    tree.insert(k, heads(n));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Random changes, insertions and deletions on both sides are found exactly, with ids
        /// that sometimes share long prefixes so that deep paths and splits are exercised.
        #[test]
        fn reported_differences_are_exact(
            base in 0usize..400,
            shared_prefix in 0usize..15,
            salt in any::<u64>(),
            a_ops in ops(),
            b_ops in ops(),
        ) {
            let make = move |n: u64| {
                let mut bytes = *id(n ^ salt).as_bytes();
                bytes[..shared_prefix].fill(0x5a);
                DocId::from_bytes(bytes)
            };
            let start: BTreeMap<DocId, Hash> = (0..base as u64).map(|n| (make(n), heads(n))).collect();
            let (mut a, mut b) = (start.clone(), start.clone());
            let (mut a_tree, mut b_tree) = (tree_of(&a), tree_of(&b));
            apply(&a_ops, &mut a, &mut a_tree, make);
            apply(&b_ops, &mut b, &mut b_tree, make);
            // Incremental maintenance gives exactly the tree a rebuild would.
            let (a_rebuilt, b_rebuilt) = (tree_of(&a), tree_of(&b));
            prop_assert_eq!(a_tree.root_node(), a_rebuilt.root_node());
            prop_assert_eq!(b_tree.root_node(), b_rebuilt.root_node());
            let run = reconcile(&a_tree, &b_tree);
            let expected = truth(&a, &b);
            prop_assert_eq!(&run.a, &expected);
            prop_assert_eq!(&run.b, &mirrored(&expected));
            prop_assert_eq!(run.a.is_empty(), a_tree.root_hash() == b_tree.root_hash());
        }

    }

    fn arb_path() -> impl Strategy<Value = NibblePath> {
        // Mostly short paths, which is where a real session's questions are.
        prop_oneof![
            3 => prop::collection::vec(0u8..16, 0..=2),
            1 => prop::collection::vec(0u8..16, 0..=MAX_DEPTH),
        ]
        .prop_map(|n| NibblePath::from_nibbles(&n).unwrap())
    }

    fn arb_id() -> impl Strategy<Value = WireId> {
        prop_oneof![
            (0u64..400).prop_map(|n| WireId(id(n))),
            any::<[u8; DOC_ID_LEN]>().prop_map(|b| WireId(DocId::from_bytes(b))),
        ]
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        let ids = || prop::collection::vec(arb_id(), 0..20);
        prop_oneof![
            (
                arb_path(),
                any::<u16>(),
                prop::collection::vec(any::<[u8; 32]>().prop_map(WireHash), 0..18)
            )
                .prop_map(|(p, bits, h)| Item::Children(p, bits, h)),
            (
                arb_path(),
                prop::collection::vec((arb_id(), any::<[u8; 32]>()), 0..20)
            )
                .prop_map(|(p, e)| Item::Entries(
                    p,
                    e.into_iter().map(|(i, h)| WireEntry(i.0, h)).collect()
                )),
            (arb_path(), ids(), ids(), ids()).prop_map(|(p, a, b, c)| Item::Settle(p, a, b, c)),
        ]
    }

    fn arb_message() -> impl Strategy<Value = DigestMessage> {
        prop_oneof![
            (
                any::<u8>(),
                prop_oneof![Just(9u64), any::<u64>()],
                any::<Option<[u8; 32]>>()
            )
                .prop_map(|(v, s, r)| DigestMessage(Wire::Start(
                    v,
                    s,
                    r.map(WireHash)
                ))),
            (
                prop_oneof![Just(9u64), any::<u64>()],
                any::<bool>(),
                prop::collection::vec(arb_item(), 0..6)
            )
                .prop_map(|(s, end, items)| DigestMessage(Wire::Step(s, end, items))),
        ]
    }

    /// One way of tampering with a message; indexes wrap around whatever is there.
    #[derive(Debug, Clone)]
    enum Tamper {
        FlipEnd,
        DropItem(usize),
        DuplicateItem(usize),
        /// Xors a byte of a hash, an entry's heads hash or a settled id.
        Corrupt(usize, usize, u8),
        DropValue(usize, usize),
        DuplicateValue(usize, usize),
        /// Moves an item one nibble deeper (`Some`) or up to its parent (`None`).
        MovePath(usize, Option<u8>),
        FlipBitmap(usize, u8),
        InventId(usize, u64),
        Session(u64),
    }

    fn tamper() -> impl Strategy<Value = Tamper> {
        prop_oneof![
            Just(Tamper::FlipEnd),
            any::<usize>().prop_map(Tamper::DropItem),
            any::<usize>().prop_map(Tamper::DuplicateItem),
            (any::<usize>(), any::<usize>(), 1u8..).prop_map(|(i, j, x)| Tamper::Corrupt(i, j, x)),
            (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Tamper::DropValue(i, j)),
            (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Tamper::DuplicateValue(i, j)),
            (any::<usize>(), any::<Option<u8>>())
                .prop_map(|(i, n)| Tamper::MovePath(i, n.map(|n| n % 16))),
            (any::<usize>(), 0u8..16).prop_map(|(i, b)| Tamper::FlipBitmap(i, b)),
            (any::<usize>(), 0u64..2000).prop_map(|(i, n)| Tamper::InventId(i, n)),
            any::<u64>().prop_map(Tamper::Session),
        ]
    }

    impl Tamper {
        fn apply(&self, message: &mut DigestMessage) {
            let Wire::Step(session, end, items) = &mut message.0 else {
                return;
            };
            let n = items.len().max(1);
            let item = |i: usize| i % n;
            match *self {
                Tamper::FlipEnd => *end = !*end,
                Tamper::DropItem(i) if !items.is_empty() => {
                    items.remove(item(i));
                }
                Tamper::DuplicateItem(i) if !items.is_empty() => items.push(items[item(i)].clone()),
                Tamper::Session(s) => *session = s,
                _ if items.is_empty() => {}
                Tamper::Corrupt(i, j, x) => match &mut items[item(i)] {
                    Item::Children(_, _, h) if !h.is_empty() => {
                        let k = j % h.len();
                        h[k].0[j % 32] ^= x;
                    }
                    Item::Entries(_, e) if !e.is_empty() => {
                        let k = j % e.len();
                        e[k].1[j % 32] ^= x;
                    }
                    Item::Settle(_, a, b, c) => {
                        for list in [a, b, c] {
                            if let Some(w) = list.first_mut() {
                                let mut bytes = *w.0.as_bytes();
                                bytes[j % DOC_ID_LEN] ^= x;
                                w.0 = DocId::from_bytes(bytes);
                            }
                        }
                    }
                    _ => {}
                },
                Tamper::DropValue(i, j) => match &mut items[item(i)] {
                    Item::Children(_, _, h) if !h.is_empty() => {
                        h.remove(j % h.len());
                    }
                    Item::Entries(_, e) if !e.is_empty() => {
                        e.remove(j % e.len());
                    }
                    Item::Settle(_, a, b, c) => {
                        for list in [a, b, c] {
                            list.pop();
                        }
                    }
                    _ => {}
                },
                Tamper::DuplicateValue(i, j) => match &mut items[item(i)] {
                    Item::Children(_, _, h) if !h.is_empty() => h.push(h[j % h.len()]),
                    Item::Entries(_, e) if !e.is_empty() => e.push(e[j % e.len()]),
                    Item::Settle(_, a, b, c) => {
                        for list in [a, b, c] {
                            if let Some(w) = list.first().copied() {
                                list.push(w);
                            }
                        }
                    }
                    _ => {}
                },
                Tamper::MovePath(i, to) => {
                    let (Item::Children(p, ..) | Item::Entries(p, ..) | Item::Settle(p, ..)) =
                        &mut items[item(i)];
                    if let Some(moved) = match to {
                        Some(nibble) => p.child(nibble),
                        None => p.parent(),
                    } {
                        *p = moved;
                    }
                }
                Tamper::FlipBitmap(i, bit) => {
                    if let Item::Children(_, bits, _) = &mut items[item(i)] {
                        *bits ^= 1 << bit;
                    }
                }
                Tamper::InventId(i, k) => match &mut items[item(i)] {
                    Item::Entries(_, e) => e.push(WireEntry(id(k), heads(k))),
                    Item::Settle(_, _, b, _) => b.push(WireId(id(k))),
                    Item::Children(..) => {}
                },
                Tamper::DropItem(_) | Tamper::DuplicateItem(_) => {}
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary messages, in any state, give errors or well-formed replies, never panics; an
        /// invalid message leaves the session refusing everything after it.
        #[test]
        fn hostile_messages_are_errors_not_panics(messages in prop::collection::vec(arb_message(), 1..6)) {
            let (a, tree, reply) = mid_session();
            let mut deeper = mid_session().0;
            for m in reply.iter().cloned() {
                deeper.handle(&tree, m).unwrap();
            }
            let mut responder = Reconciler::new();
            responder.handle(&tree, DigestMessage(Wire::Start(PROTOCOL_VERSION, 9, Some(WireHash([7; 32]))))).unwrap();
            let mut started = Reconciler::new();
            started.start(9, &tree).unwrap();
            for mut r in [a, deeper, responder, Reconciler::new(), started] {
                for m in messages.iter().cloned() {
                    let was_failed = r.is_failed();
                    match r.handle(&tree, m) {
                        Ok(progress) => {
                            prop_assert!(!was_failed);
                            for out in &progress.send {
                                prop_assert!(out.encoded_len() <= MAX_MESSAGE_BYTES);
                                if let Wire::Step(_, _, items) = &out.0 {
                                    prop_assert!(items.len() <= MAX_ITEMS_PER_MESSAGE);
                                    prop_assert!(items.iter().map(Item::weight).sum::<usize>() <= MAX_VALUES_PER_MESSAGE);
                                }
                            }
                        }
                        Err(e) => prop_assert!(!e.to_string().is_empty()),
                    }
                }
            }
        }

        /// A peer that tampers with real messages mid-session (changed hashes, dropped,
        /// duplicated or invented values, moved paths, lost turn ends) only ever produces errors
        /// or consistent progress, and a failed session stays failed.
        #[test]
        fn tampered_sessions_are_errors_not_panics(
            tampers in prop::collection::vec((0usize..12, tamper()), 1..4),
            changed in prop::collection::vec(0u64..300, 1..20),
        ) {
            let a_tree: DigestTree = (0..300).map(|n| (id(n), heads(n))).collect();
            let mut b_tree = a_tree.clone();
            for n in changed {
                if n % 3 == 0 { b_tree.remove(&id(n)); } else { b_tree.insert(id(n + 1000 * (n % 2)), heads(n + 7)); }
            }
            let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
            let mut to_b = vec![a.start(9, &a_tree).unwrap()];
            let mut delivered = 0;
            let mut outcome = Ok(());
            'session: for _ in 0..100 {
                let mut to_a = Vec::new();
                for m in to_b.drain(..) {
                    match b.handle(&b_tree, m) {
                        Ok(p) => to_a.extend(p.send),
                        Err(e) => { outcome = Err(e); break 'session; }
                    }
                }
                for mut m in to_a {
                    for (at, tamper) in &tampers {
                        if *at == delivered { tamper.apply(&mut m); }
                    }
                    delivered += 1;
                    let stray = m.session() != 9;
                    match a.handle(&a_tree, m) {
                        Ok(p) => to_b.extend(p.send),
                        // A stray session id is refused and ignored; the session goes on.
                        Err(_) if stray => prop_assert!(!a.is_failed()),
                        Err(e) => { outcome = Err(e); break 'session; }
                    }
                }
                if to_b.is_empty() { break; }
            }
            if outcome.is_err() {
                prop_assert!(a.is_failed() || b.is_failed());
                let probe = DigestMessage(Wire::Step(9, true, vec![]));
                if a.is_failed() { prop_assert!(a.handle(&a_tree, probe.clone()).is_err()); }
                if b.is_failed() { prop_assert!(b.handle(&b_tree, probe).is_err()); }
            }
        }

        /// Corrupted encodings of real messages decode to errors or to messages that are then
        /// handled without panicking.
        #[test]
        fn corrupted_bytes_are_errors_not_panics(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let (mut a, tree, reply) = mid_session();
            for m in reply {
                let mut bytes = m.encode();
                for (at, value) in &flips {
                    let i = at.index(bytes.len());
                    bytes[i] ^= value;
                }
                if truncate {
                    bytes.truncate(cut.index(bytes.len()));
                }
                if let Ok(decoded) = DigestMessage::decode(&bytes) {
                    let _ = a.handle(&tree, decoded);
                }
            }
        }

    }
}
