//! In-process multi-peer harness: N engines on a simulated network that drops,
//! duplicates and reorders frames according to a seed, driven until quiet.
//!
//! Frames cross the network encoded, through [`wire::encode`] and
//! [`wire::decode`], so the envelope code is on every path the tests take.
//!
//! Outside this crate's own tests it is compiled only with the `harness`
//! feature. It is test code: its calls panic where a test should fail.
//!
//! ```
//! use hearth_crdt::harness::{Faults, Net};
//! use hearth_crdt::{DocId, EngineConfig, EntityUpdate};
//!
//! let doc = DocId::from_bytes([7; 16]);
//! let mut net = Net::new(3, 42, EngineConfig::default());
//! net.share_entity(doc);
//! net.run_until_quiet(10_000);
//! // Lose, repeat and shuffle frames while two nodes write.
//! net.faults = Faults { drop_pct: 20, dup_pct: 10, reorder: true };
//! for (node, state) in [(1, "on"), (2, "dim")] {
//!     let update = EntityUpdate { state: state.into(), attributes: None };
//!     net.edit(node, doc, &update, None);
//!     for _ in 0..5 {
//!         net.step();
//!     }
//! }
//! // Once the network heals, every replica holds the same document.
//! net.faults = Faults::RELIABLE;
//! net.run_until_quiet(100_000);
//! net.assert_converged(doc);
//! ```

use crate::engine::{Engine, EngineConfig, Output};
use crate::ids::{DocId, KeyEpoch};
use crate::schema::DocKind;
use crate::schema::entity::EntityUpdate;
use crate::wire;

/// Deterministic generator (SplitMix64): the harness needs reproducible
/// randomness from a seed, nothing more.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn percent(&mut self, p: u8) -> bool {
        self.below(100) < usize::from(p)
    }
}

/// Network misbehaviour, in percent per frame.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Chance that a frame is lost, in percent.
    pub drop_pct: u8,
    /// Chance that a frame is delivered and also queued again at a random
    /// place, in percent.
    pub dup_pct: u8,
    /// Deliver a random frame in flight rather than the oldest.
    pub reorder: bool,
}

impl Faults {
    /// Every frame delivered once, in the order sent.
    pub const RELIABLE: Faults = Faults {
        drop_pct: 0,
        dup_pct: 0,
        reorder: false,
    };
}

/// A frame on the wire.
struct InFlight {
    from: usize,
    to: usize,
    bytes: Vec<u8>,
}

/// What happened on the network, for assertions.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    /// Frames handed to their recipient (a duplicate counts again).
    pub delivered: u64,
    /// Frames lost to [`Faults::drop_pct`].
    pub dropped: u64,
    /// Frames queued twice by [`Faults::dup_pct`].
    pub duplicated: u64,
    /// Deliveries that [`Engine::receive`] refused with an error.
    pub receive_errors: u64,
    /// Largest push or sync payload sent.
    pub largest_payload: usize,
}

/// `n` engines, peers of each other as `0..n`, on one simulated network with one
/// clock. Frames sent are held in flight until [`Net::step`] delivers them.
pub struct Net {
    /// The engines; node `i` is peer `i` to the others.
    pub nodes: Vec<Engine<usize>>,
    in_flight: Vec<InFlight>,
    rng: Rng,
    /// How the network misbehaves from the next delivery on.
    pub faults: Faults,
    /// The clock every call into the engines is given, in milliseconds.
    pub now_ms: u64,
    /// Counters of the network so far.
    pub stats: NetStats,
    /// Correlation ids seen in remote `Changed` outputs, per node.
    pub remote_correlations: Vec<Vec<String>>,
    /// Nodes cut off from the rest: frames from or to them are lost.
    pub isolated: Vec<bool>,
    /// What each node was told to persist, per document (a snapshot replaces the
    /// chunks before it), for [`Net::restart`].
    pub disk: Vec<std::collections::BTreeMap<DocId, Vec<Vec<u8>>>>,
    config: EngineConfig,
}

/// Envelope cap used on the simulated wire.
const WIRE_CAP: usize = wire::DEFAULT_MAX_FRAME_BYTES;

impl Net {
    /// `n` engines with `config`, named `peer-0`, `peer-1`, ... (their actor ids
    /// come from those names), on a reliable network whose faults, once set, are
    /// drawn from `seed`. The clock starts at 1000 ms.
    pub fn new(n: usize, seed: u64, config: EngineConfig) -> Self {
        let nodes = (0..n)
            .map(|i| Engine::new(format!("peer-{i}").as_bytes(), config.clone()))
            .collect();
        let isolated = vec![false; n];
        let disk = vec![std::collections::BTreeMap::new(); n];
        Self {
            nodes,
            in_flight: Vec::new(),
            rng: Rng::new(seed),
            faults: Faults::RELIABLE,
            now_ms: 1_000,
            stats: NetStats::default(),
            remote_correlations: vec![Vec::new(); n],
            isolated,
            disk,
            config,
        }
    }

    /// Every other node expects `doc` (which node `from` holds) and every pair is
    /// attached, as a node does with a new document of its home.
    pub fn spread(&mut self, from: usize, doc: DocId) {
        let header = self.nodes[from].header(doc).unwrap().clone();
        for i in 0..self.nodes.len() {
            if i != from {
                self.nodes[i].expect_document(
                    doc,
                    header.kind,
                    &header.owner_home,
                    header.key_epoch,
                );
            }
        }
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    let out = self.nodes[a].attach(b, doc, None, self.now_ms).unwrap();
                    self.absorb(a, out);
                }
            }
        }
    }

    /// Stops node `node` and starts it again from what it persisted: its frames in
    /// flight are lost and every session with it starts over.
    pub fn restart(&mut self, node: usize) {
        self.in_flight.retain(|m| m.from != node && m.to != node);
        let mut fresh = Engine::new(format!("peer-{node}").as_bytes(), self.config.clone());
        *fresh.actor_homes_mut() = self.nodes[node].actor_homes().clone();
        let docs: Vec<DocId> = self.nodes[node].documents().collect();
        for doc in &docs {
            match self.disk[node].get(doc) {
                Some(chunks) => fresh.load_document(*doc, chunks).unwrap(),
                // Known by key only, as a node tracks documents whose content has not
                // arrived yet.
                None => {
                    let h = self.nodes[node].header(*doc).unwrap().clone();
                    fresh.expect_document(*doc, h.kind, &h.owner_home, h.key_epoch);
                }
            }
        }
        self.nodes[node] = fresh;
        for doc in docs {
            for other in 0..self.nodes.len() {
                if other == node || self.nodes[other].header(doc).is_err() {
                    continue;
                }
                self.nodes[other].detach(&node, doc);
                let out = self.nodes[other]
                    .attach(node, doc, None, self.now_ms)
                    .unwrap();
                self.absorb(other, out);
                let out = self.nodes[node]
                    .attach(other, doc, None, self.now_ms)
                    .unwrap();
                self.absorb(node, out);
            }
        }
    }

    /// Node 0 creates an entity (`light.test` of `home-1`, state `off`); every
    /// other node expects it; every pair is attached.
    pub fn share_entity(&mut self, doc: DocId) {
        let epoch = KeyEpoch::first([0; 16]);
        let first = EntityUpdate {
            state: "off".into(),
            attributes: None,
        };
        let out = self.nodes[0]
            .create_entity(doc, "home-1", epoch, "light.test", &first, self.now_ms)
            .unwrap();
        self.absorb(0, out);
        for i in 1..self.nodes.len() {
            self.nodes[i].expect_document(doc, DocKind::Entity, "home-1", epoch);
        }
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    let out = self.nodes[a].attach(b, doc, None, self.now_ms).unwrap();
                    self.absorb(a, out);
                }
            }
        }
    }

    /// Queues the frames among a node's outputs, and records the correlation ids
    /// of remote changes. Pass it what a direct call into `nodes[from]` returned.
    pub fn absorb(&mut self, from: usize, outputs: Vec<Output<usize>>) {
        for o in outputs {
            match o {
                Output::Send { peer, frame } => {
                    let payload = match &frame {
                        wire::Frame::Push(p) => p.bytes.len(),
                        wire::Frame::Sync(m) => m.bytes.len(),
                        _ => 0,
                    };
                    self.stats.largest_payload = self.stats.largest_payload.max(payload);
                    self.in_flight.push(InFlight {
                        from,
                        to: peer,
                        bytes: wire::encode(&frame),
                    });
                }
                Output::Changed {
                    correlation_id: Some(c),
                    origin: crate::engine::Origin::Peer(_),
                    ..
                } => self.remote_correlations[from].push(c),
                Output::PersistChunk { doc, kind, bytes } => {
                    let chunks = self.disk[from].entry(doc).or_default();
                    if kind == crate::engine::ChunkKind::Snapshot {
                        chunks.clear();
                    }
                    chunks.push(bytes);
                }
                _ => {}
            }
        }
    }

    /// Number of frames in flight.
    pub fn pending(&self) -> usize {
        self.in_flight.len()
    }

    /// Delivers one frame, subject to the faults. Returns false when nothing
    /// was in flight.
    pub fn step(&mut self) -> bool {
        if self.in_flight.is_empty() {
            return false;
        }
        let i = if self.faults.reorder {
            self.rng.below(self.in_flight.len())
        } else {
            0
        };
        let msg = self.in_flight.remove(i);
        if self.isolated[msg.from]
            || self.isolated[msg.to]
            || self.rng.percent(self.faults.drop_pct)
        {
            self.stats.dropped += 1;
            return true;
        }
        if self.rng.percent(self.faults.dup_pct) {
            self.stats.duplicated += 1;
            let at = self.rng.below(self.in_flight.len() + 1);
            self.in_flight.insert(
                at,
                InFlight {
                    from: msg.from,
                    to: msg.to,
                    bytes: msg.bytes.clone(),
                },
            );
        }
        self.stats.delivered += 1;
        let frame = wire::decode(&msg.bytes, WIRE_CAP).expect("harness frames are well formed");
        match self.nodes[msg.to].receive(msg.from, frame, self.now_ms) {
            Ok(out) => self.absorb(msg.to, out),
            Err(_) => self.stats.receive_errors += 1,
        }
        true
    }

    /// Moves time forward by `ms`, running due timers.
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        for i in 0..self.nodes.len() {
            let out = self.nodes[i].tick(self.now_ms);
            self.absorb(i, out);
        }
    }

    /// Delivers frames and fires timers until nothing is in flight and no
    /// timer is pending. Returns the number of deliveries, or panics (this is
    /// test code) if the network never settles.
    pub fn run_until_quiet(&mut self, max_steps: usize) -> usize {
        let mut steps = 0;
        loop {
            while self.step() {
                steps += 1;
                if steps >= max_steps {
                    self.dump();
                    panic!("network did not settle in {max_steps} steps");
                }
            }
            let next = self.nodes.iter().filter_map(|n| n.next_deadline()).min();
            match next {
                Some(at) => {
                    let at = at.max(self.now_ms);
                    self.advance(at - self.now_ms);
                    steps += 1;
                    if steps >= max_steps {
                        self.dump();
                        panic!("timers did not settle in {max_steps} steps");
                    }
                }
                None => return steps,
            }
        }
    }

    /// Prints session state and the frames in flight, when a run fails to
    /// settle.
    fn dump(&mut self) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            eprintln!("node {i}:\n{}", n.debug_sessions());
        }
        for m in self.in_flight.iter().take(20) {
            let f = wire::decode(&m.bytes, WIRE_CAP);
            let what = match f {
                Ok(crate::wire::Frame::Sync(s)) => {
                    let msg = automerge::sync::Message::decode(&s.bytes).ok();
                    format!(
                        "sync reply={} heads={:?} need={} have={} changes={}",
                        s.expects_reply,
                        msg.as_ref().map(|m| m
                            .heads
                            .iter()
                            .map(|h| h.to_string()[..6].to_string())
                            .collect::<Vec<_>>()),
                        msg.as_ref().map_or(0, |m| m.need.len()),
                        msg.as_ref().map_or(0, |m| m.have.len()),
                        msg.as_ref().map_or(0, |m| m.changes.len()),
                    )
                }
                Ok(other) => format!("{other:?}").chars().take(40).collect(),
                Err(e) => e.to_string(),
            };
            eprintln!("{} -> {}: {what}", m.from, m.to);
        }
    }

    /// Node `node` writes `update` to entity `doc` (with correlation id `corr`)
    /// and sends what the write produced.
    pub fn edit(&mut self, node: usize, doc: DocId, update: &EntityUpdate, corr: Option<String>) {
        let out = self.nodes[node]
            .update_entity(doc, update, self.now_ms, corr)
            .unwrap();
        self.absorb(node, out);
    }

    /// Asserts identical heads and equal entity views everywhere.
    pub fn assert_converged(&mut self, doc: DocId) {
        let heads0 = self.nodes[0].heads(doc).unwrap();
        let view0 = self.nodes[0].entity(doc).unwrap();
        for i in 1..self.nodes.len() {
            assert_eq!(
                self.nodes[i].heads(doc).unwrap(),
                heads0,
                "heads of node {i}"
            );
            assert_eq!(
                self.nodes[i].entity(doc).unwrap(),
                view0,
                "view of node {i}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::wire::{Frame, Push, SyncMessage};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT, ReadDoc};
    use proptest::prelude::*;
    use serde_json::json;

    const DOC: DocId = DocId::from_bytes([42; 16]);

    fn update(state: &str, attrs: serde_json::Value) -> EntityUpdate {
        EntityUpdate {
            state: state.into(),
            attributes: match attrs {
                serde_json::Value::Object(m) => Some(m),
                _ => None,
            },
        }
    }

    fn synced(n: usize) -> Net {
        let mut net = Net::new(n, 7, EngineConfig::default());
        net.share_entity(DOC);
        net.run_until_quiet(10_000);
        net
    }

    #[test]
    fn replicas_catch_up_and_then_use_direct_pushes() {
        let mut net = synced(3);
        net.assert_converged(DOC);
        for a in 0..3 {
            for b in 0..3 {
                if a != b {
                    assert!(net.nodes[a].is_in_sync(&b, DOC), "{a} -> {b}");
                }
            }
        }
        let sync_before = net.nodes[1].stats().sync_sent;
        net.edit(
            0,
            DOC,
            &update("on", json!({"brightness": 80})),
            Some("req-1".into()),
        );
        // Only the two pushes are in flight; no sync round yet.
        assert_eq!(net.pending(), 2);
        while net.step() {}
        assert_eq!(net.nodes[1].stats().pushes_applied, 1);
        assert_eq!(net.nodes[1].stats().sync_sent, sync_before);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "on");
        assert_eq!(net.remote_correlations[1], vec!["req-1".to_string()]);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    /// Devices that write faster than a round trip, starting out of push mode (a
    /// reconnect): each write goes as one push, and the sync messages of the
    /// exchange that confirms them stay few instead of one round per write.
    #[test]
    fn busy_writers_push_and_do_not_trade_sync_messages() {
        for writers in [1usize, 2] {
            let mut net = synced(2);
            let now = net.now_ms;
            for (a, b) in [(0, 1), (1, 0)] {
                let out = net.nodes[a].attach(b, DOC, None, now).unwrap();
                net.absorb(a, out);
            }
            let sync_before: u64 = (0..2).map(|i| net.nodes[i].stats().sync_sent).sum();
            let pushes_before: u64 = (0..2).map(|i| net.nodes[i].stats().pushes_sent).sum();
            let writes: u64 = 300;
            for i in 0..writes {
                let by = (i as usize) % writers;
                net.edit(by, DOC, &update(&format!("s{i}"), json!({})), None);
                // About a round trip of frames stays in flight.
                while net.pending() > 3 {
                    net.step();
                }
                net.advance(1);
            }
            let sync: u64 =
                (0..2).map(|i| net.nodes[i].stats().sync_sent).sum::<u64>() - sync_before;
            let pushes: u64 = (0..2)
                .map(|i| net.nodes[i].stats().pushes_sent)
                .sum::<u64>()
                - pushes_before;
            assert!(
                pushes >= writes - 10,
                "{writers} writer(s): {pushes} of {writes} writes pushed"
            );
            assert!(
                sync <= 30,
                "{writers} writer(s): {sync} sync messages for {writes} writes"
            );
            net.run_until_quiet(100_000);
            net.assert_converged(DOC);
            assert_eq!(
                net.nodes[1].entity(DOC).unwrap().state,
                format!("s{}", writes - 1)
            );
        }
    }

    /// A confirmation round asks for an answer, so a lost one is sent again: a push
    /// and the confirmation after it both lost still reach the peer.
    #[test]
    fn a_lost_push_and_a_lost_confirmation_are_sent_again() {
        let mut net = synced(2);
        net.edit(0, DOC, &update("on", json!({})), None);
        net.in_flight.clear();
        let at = net.nodes[0].next_deadline().unwrap();
        net.advance(at - net.now_ms);
        assert!(net.pending() > 0, "the confirmation round went out");
        net.in_flight.clear();
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "on");
    }

    /// An answer that asks for none does not leave the exchange marked in flight. Here
    /// 1's confirmation round goes twice (0 was slow), 0 answers both, writing between
    /// them, and its push and second answer are lost: 0's own confirmation round must
    /// still go out, as 1, answered once, waits for nothing.
    #[test]
    fn a_lost_push_and_a_lost_answer_are_confirmed_again() {
        let mut net = synced(2);
        net.edit(1, DOC, &update("q", json!({})), None);
        assert!(net.step(), "1's push reaches 0");
        let at = net.nodes[1].next_deadline().unwrap();
        net.advance(at - net.now_ms);
        assert_eq!(net.pending(), 1, "1's confirmation round is in flight");
        let first = net.in_flight.remove(0);
        let at = net.nodes[1].next_deadline().unwrap();
        net.advance(at - net.now_ms);
        assert_eq!(net.pending(), 1, "1 sent its confirmation round again");
        net.in_flight.insert(0, first);
        assert!(net.step(), "0 answers the first");
        net.edit(0, DOC, &update("p", json!({})), None);
        let push = net.in_flight.pop().unwrap();
        assert_eq!(push.from, 0, "0's push is lost");
        assert!(net.step(), "0 answers the second");
        assert!(net.step(), "1 hears the first answer");
        net.in_flight.retain(|m| m.from != 0);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "p");
    }

    /// A relay to a third device asks for an answer too: lost once, it goes again.
    #[test]
    fn a_lost_relay_is_sent_again() {
        // A chain 0 - 1 - 2: 0 and 2 do not meet.
        let mut net = synced(3);
        net.nodes[0].detach(&2, DOC);
        net.nodes[2].detach(&0, DOC);
        net.edit(0, DOC, &update("on", json!({})), None);
        assert!(net.step(), "the push reaches 1");
        let at = net.nodes[1].next_deadline().unwrap();
        net.advance(at - net.now_ms);
        net.in_flight.retain(|m| !(m.from == 1 && m.to == 2));
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[2].entity(DOC).unwrap().state, "on");
    }

    #[test]
    fn push_with_missing_dependencies_falls_back_to_sync_and_converges() {
        let mut net = synced(2);
        net.edit(0, DOC, &update("on", json!({})), None);
        net.in_flight.clear(); // the first push is lost
        net.edit(
            0,
            DOC,
            &update("dim", json!({"brightness": 20})),
            Some("req-2".into()),
        );
        assert_eq!(net.pending(), 1);
        assert!(net.step());
        let s = net.nodes[1].stats();
        assert_eq!(s.pushes_deferred, 1, "{s:?}");
        assert_eq!(s.pushes_applied, 0);
        // Node 1 asked node 0 to catch it up.
        assert!(net.pending() > 0);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "dim");
        let s = net.nodes[1].stats();
        // The parked push was either applied once its dependency arrived, or
        // found already applied by the sync round; either way not lost.
        assert_eq!(s.pushes_unparked, 1, "{s:?}");
    }

    #[test]
    fn reordered_pushes_are_parked_then_applied() {
        let mut net = synced(2);
        net.edit(0, DOC, &update("a", json!({})), None);
        net.edit(0, DOC, &update("b", json!({})), None);
        // Deliver the second push first.
        let second = net.in_flight.pop().unwrap();
        net.in_flight.insert(0, second);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "b");
        assert!(net.nodes[1].stats().pushes_deferred >= 1);
    }

    #[test]
    fn a_lost_push_is_recovered_by_the_confirmation_round() {
        let mut net = synced(2);
        net.edit(0, DOC, &update("on", json!({})), None);
        net.in_flight.clear();
        // No further writes: only the timer-driven confirmation finds the gap.
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "on");
    }

    #[test]
    fn the_confirmation_round_after_a_delivered_push_does_not_carry_it_again() {
        let mut net = synced(2);
        // 4 KB that does not compress.
        let mut x = 7u64;
        let blob: String = (0..4000)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                char::from(b'a' + (x >> 59) as u8)
            })
            .collect();
        net.edit(0, DOC, &update("on", json!({ "blob": blob })), None);
        assert_eq!(net.pending(), 1);
        assert!(
            net.in_flight[0].bytes.len() > 3000,
            "the push carries the blob"
        );
        assert!(net.step(), "the push arrives");
        let mut resent = 0;
        let mut confirmations = 0;
        loop {
            for m in &net.in_flight {
                if m.from == 0 {
                    confirmations += 1;
                    if m.bytes.len() > 3000 {
                        resent += 1;
                    }
                }
            }
            if net.step() {
                continue;
            }
            match net.nodes.iter().filter_map(|n| n.next_deadline()).min() {
                Some(at) => {
                    let at = at.max(net.now_ms);
                    net.advance(at - net.now_ms);
                }
                None => break,
            }
        }
        assert!(confirmations > 0, "a confirmation round ran");
        assert_eq!(resent, 0, "a sync message carried the pushed change again");
        net.assert_converged(DOC);
        assert!(net.nodes[1].is_in_sync(&0, DOC));
    }

    /// Two devices attach in sync (a digest exchange found their heads equal) while one
    /// of them wrote meanwhile: what it wrote was never pushed, and every later push waits
    /// at the other for it. The sessions must still find the gap and fill it.
    #[test]
    fn a_session_attached_in_sync_over_unsent_changes_still_converges() {
        for n in [2, 3] {
            let mut net = synced(n);
            for other in 1..n {
                net.nodes[0].detach(&other, DOC);
                net.nodes[other].detach(&0, DOC);
            }
            for i in 0..3 {
                net.edit(0, DOC, &update(&format!("unsent-{i}"), json!({})), None);
            }
            assert_eq!(net.pending(), 0, "no session, so nothing was pushed");
            for other in 1..n {
                net.nodes[0].attach_in_sync(other, DOC, None).unwrap();
                net.nodes[other].attach_in_sync(0, DOC, None).unwrap();
            }
            for i in 0..5 {
                net.edit(0, DOC, &update(&format!("pushed-{i}"), json!({})), None);
                // Some pushes arrive before the next write, as on a live network.
                if i % 2 == 0 {
                    net.step();
                }
            }
            net.run_until_quiet(10_000);
            net.assert_converged(DOC);
        }
    }

    #[test]
    fn lost_sync_messages_are_retried() {
        let mut net = Net::new(2, 3, EngineConfig::default());
        net.share_entity(DOC);
        net.in_flight.clear(); // both opening messages are lost
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert!(net.nodes.iter().any(|n| n.stats().session_restarts > 0));
    }

    #[test]
    fn concurrent_writes_converge_to_one_value() {
        let mut net = synced(3);
        for i in 0..3 {
            net.edit(
                i,
                DOC,
                &update(&format!("s{i}"), json!({ format!("k{i}"): i })),
                None,
            );
        }
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        let e = net.nodes[0].entity(DOC).unwrap();
        // Different attribute keys merge; the state is one of the writes.
        assert_eq!(e.attributes.len(), 3);
        assert!(["s0", "s1", "s2"].contains(&e.state.as_str()));
    }

    #[test]
    fn reattach_with_saved_state_resumes() {
        let mut net = synced(2);
        let saved = net.nodes[0].detach(&1, DOC).unwrap();
        let saved_b = net.nodes[1].detach(&0, DOC).unwrap();
        net.edit(0, DOC, &update("later", json!({})), None);
        assert_eq!(net.pending(), 0, "no session, nothing to send");
        let out = net.nodes[0]
            .attach(1, DOC, Some(&saved), net.now_ms)
            .unwrap();
        net.absorb(0, out);
        let out = net.nodes[1]
            .attach(0, DOC, Some(&saved_b), net.now_ms)
            .unwrap();
        net.absorb(1, out);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        let err = net.nodes[0]
            .attach(1, DOC, Some(&[1, 2, 3]), net.now_ms)
            .unwrap_err();
        assert!(matches!(err, Error::SyncState { .. }));
    }

    #[test]
    fn a_detached_peer_leaves_no_session_and_no_timer() {
        let mut net = Net::new(2, 7, EngineConfig::default());
        net.share_entity(DOC);
        // Both sides have sent opening messages and wait for answers: timers are set.
        assert!(net.nodes[0].next_deadline().is_some());
        let saved = net.nodes[0].detach_peer(&1);
        let saved_b = net.nodes[1].detach_peer(&0);
        net.in_flight.clear();
        assert_eq!(saved.len(), 1, "the state to persist comes back");
        assert_eq!(net.nodes[0].next_deadline(), None);
        assert!(!net.nodes[0].is_in_sync(&1, DOC));
        // Much later, nothing of the old session fires.
        let out = net.nodes[0].tick(net.now_ms + 3_600_000);
        assert!(out.is_empty(), "{out:?}");
        // Returning resumes from the saved shared heads.
        let out = net.nodes[0]
            .attach(1, DOC, Some(&saved[0].1), net.now_ms)
            .unwrap();
        net.absorb(0, out);
        let out = net.nodes[1]
            .attach(0, DOC, Some(&saved_b[0].1), net.now_ms)
            .unwrap();
        net.absorb(1, out);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    #[test]
    fn persisted_chunks_restore_the_document() {
        let mut net = Net::new(
            1,
            1,
            EngineConfig {
                compact_after_chunks: 4,
                ..EngineConfig::default()
            },
        );
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        let epoch = KeyEpoch::first([0; 16]);
        let out = net.nodes[0]
            .create_entity(DOC, "h", epoch, "fan", &update("off", json!({})), 1)
            .unwrap();
        let keep = |out: &[Output<usize>], chunks: &mut Vec<Vec<u8>>| {
            for o in out {
                if let Output::PersistChunk { kind, bytes, .. } = o {
                    if *kind == crate::engine::ChunkKind::Snapshot {
                        chunks.clear();
                    }
                    chunks.push(bytes.clone());
                }
            }
        };
        keep(&out, &mut chunks);
        for i in 0..10 {
            let out = net.nodes[0]
                .update_entity(
                    DOC,
                    &update(&format!("s{i}"), json!({ "i": i })),
                    10 + i,
                    None,
                )
                .unwrap();
            keep(&out, &mut chunks);
        }
        assert!(net.nodes[0].stats().compactions >= 1);
        assert!(chunks.len() <= 5);
        let mut fresh: Engine<usize> = Engine::new(b"peer-0", EngineConfig::default());
        fresh.load_document(DOC, &chunks).unwrap();
        assert_eq!(fresh.heads(DOC).unwrap(), net.nodes[0].heads(DOC).unwrap());
        assert_eq!(
            fresh.entity(DOC).unwrap(),
            net.nodes[0].entity(DOC).unwrap()
        );
    }

    #[test]
    fn schema_violating_changes_are_kept_and_reported_by_path() {
        let mut net = synced(2);
        // A peer writes a number where a string belongs, bypassing the view.
        let (_, out) = net.nodes[0]
            .transact(DOC, net.now_ms, None, |doc, _, _| {
                let (_, e) = doc.get(ROOT, "entity").unwrap().unwrap();
                doc.put(&e, "state", 5_i64).unwrap();
                Ok(())
            })
            .unwrap();
        net.absorb(0, out);
        let mut errors = Vec::new();
        while let Some(m) = net.in_flight.pop() {
            let frame = wire::decode(&m.bytes, WIRE_CAP).unwrap();
            for o in net.nodes[m.to].receive(m.from, frame, net.now_ms).unwrap() {
                if let Output::Changed {
                    schema_error: Some(e),
                    ..
                } = o
                {
                    errors.push(e);
                }
            }
        }
        assert!(
            matches!(&errors[..], [Error::Schema { path, .. }] if path == "entity.state"),
            "{errors:?}"
        );
        assert!(
            matches!(net.nodes[1].entity(DOC), Err(Error::Schema { path, .. }) if path == "entity.state")
        );
        assert_eq!(net.nodes[1].stats().schema_violations, 1);
        // A valid write repairs it everywhere.
        net.edit(1, DOC, &update("on", json!({})), None);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    #[test]
    fn malformed_frames_are_errors_and_reset_only_their_session() {
        let mut net = synced(3);
        let epoch = KeyEpoch::first([0; 16]);
        let node = &mut net.nodes[0];
        let push = |bytes: Vec<u8>| {
            Frame::Push(Push {
                doc: DOC,
                epoch,
                correlation_id: None,
                bytes,
            })
        };
        let sync = |bytes: Vec<u8>| {
            Frame::Sync(SyncMessage {
                doc: DOC,
                epoch,
                expects_reply: true,
                bytes,
            })
        };

        assert!(matches!(
            node.receive(1, push(vec![1, 2, 3]), 5),
            Err(Error::Changes { .. })
        ));
        assert!(matches!(
            node.receive(
                1,
                push(vec![0; crate::engine::DEFAULT_MAX_PUSH_BYTES + 1]),
                5
            ),
            Err(Error::TooLarge { .. })
        ));
        let unknown = Frame::Push(Push {
            doc: DocId::from_bytes([9; 16]),
            epoch,
            correlation_id: None,
            bytes: vec![],
        });
        assert!(matches!(
            node.receive(1, unknown, 5),
            Err(Error::UnknownDocument(_))
        ));

        assert!(node.is_in_sync(&1, DOC) && node.is_in_sync(&2, DOC));
        assert!(matches!(
            node.receive(1, sync(vec![0x42, 0xff]), 5),
            Err(Error::Sync { .. })
        ));
        assert!(!node.is_in_sync(&1, DOC), "the failing session is reset");
        assert!(node.is_in_sync(&2, DOC), "other sessions are untouched");
        assert!(matches!(
            node.receive(
                1,
                sync(vec![
                    0x42;
                    crate::engine::DEFAULT_MAX_SYNC_MESSAGE_BYTES + 1
                ]),
                5
            ),
            Err(Error::TooLarge { .. })
        ));
        assert!(
            node.next_deadline().is_some_and(|t| t <= 5),
            "a reset session re-opens on tick"
        );
        assert!(matches!(
            node.receive(1, Frame::Digest(wire::DigestFrame { bytes: vec![] }), 5),
            Err(Error::Wire(_))
        ));

        // A truncated real push is an error too.
        let out = net.nodes[1]
            .update_entity(DOC, &update("x", json!({})), net.now_ms, None)
            .unwrap();
        let real = out
            .into_iter()
            .find_map(|o| match o {
                Output::Send {
                    frame: Frame::Push(p),
                    ..
                } => Some(p.bytes),
                _ => None,
            })
            .unwrap();
        let node = &mut net.nodes[0];
        for cut in [1, real.len() / 2, real.len() - 1] {
            assert!(node.receive(1, push(real[..cut].to_vec()), 6).is_err());
        }
        // And the session still recovers to convergence.
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    #[test]
    fn a_panic_inside_automerge_rebuilds_the_document() {
        let mut net = synced(2);
        net.nodes[1].fail_next_apply = true;
        net.edit(0, DOC, &update("on", json!({})), None);
        let m = net.in_flight.remove(0);
        let frame = wire::decode(&m.bytes, WIRE_CAP).unwrap();
        let before = net.nodes[1].heads(DOC).unwrap();
        let err = net.nodes[1].receive(0, frame, net.now_ms).unwrap_err();
        assert!(matches!(err, Error::Panicked { .. }), "{err}");
        let s = net.nodes[1].stats();
        assert_eq!((s.panics_caught, s.documents_recovered), (1, 1));
        assert_eq!(net.nodes[1].heads(DOC).unwrap(), before);
        // The reset session catches up on the next tick.
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    #[test]
    fn actors_of_pushes_and_sync_messages_are_listed() {
        let mut net = Net::new(2, 5, EngineConfig::default());
        net.share_entity(DOC);
        let opening = net
            .in_flight
            .iter()
            .find(|m| m.from == 0)
            .map(|m| m.bytes.clone())
            .unwrap();
        let frame = wire::decode(&opening, WIRE_CAP).unwrap();
        // The opening message carries no changes.
        assert!(
            crate::engine::payload_actors(&frame, &EngineConfig::default())
                .unwrap()
                .is_empty()
        );
        net.run_until_quiet(10_000);
        let out = net.nodes[1]
            .update_entity(DOC, &update("on", json!({})), net.now_ms, None)
            .unwrap();
        let push = out
            .into_iter()
            .find_map(|o| match o {
                Output::Send { frame, .. } => Some(frame),
                _ => None,
            })
            .unwrap();
        let actors = crate::engine::payload_actors(&push, &EngineConfig::default()).unwrap();
        assert_eq!(
            actors.into_iter().collect::<Vec<_>>(),
            vec![crate::ids::actor_for_peer(b"peer-1")]
        );

        // A sync message that carries node 0's creation change names node 0.
        let mut fresh = Net::new(2, 6, EngineConfig::default());
        fresh.share_entity(DOC);
        let mut seen = std::collections::BTreeSet::new();
        while let Some(m) = fresh.in_flight.pop() {
            let frame = wire::decode(&m.bytes, WIRE_CAP).unwrap();
            seen.extend(crate::engine::payload_actors(&frame, &EngineConfig::default()).unwrap());
            let out = fresh.nodes[m.to].receive(m.from, frame, 1).unwrap();
            fresh.absorb(m.to, out);
        }
        assert!(seen.contains(&crate::ids::actor_for_peer(b"peer-0")));
    }

    #[test]
    fn writes_are_refused_cleanly_on_unknown_documents_and_bad_updates() {
        let mut net = synced(1);
        let err = net.nodes[0]
            .update_entity(DocId::from_bytes([1; 16]), &update("x", json!({})), 1, None)
            .unwrap_err();
        assert!(matches!(err, Error::UnknownDocument(_)));
        let before = net.nodes[0].heads(DOC).unwrap();
        let mut deep = json!(0);
        for _ in 0..40 {
            deep = json!({ "d": deep });
        }
        assert!(
            net.nodes[0]
                .update_entity(DOC, &update("x", json!({ "d": deep })), 1, None)
                .is_err()
        );
        assert_eq!(
            net.nodes[0].heads(DOC).unwrap(),
            before,
            "a refused write leaves no change"
        );
        assert_eq!(net.nodes[0].entity(DOC).unwrap().state, "off");
    }

    /// One step of the convergence property.
    #[derive(Clone, Debug)]
    enum Op {
        Edit {
            node: usize,
            state: u8,
            key: u8,
            value: i64,
        },
        Deliver(u8),
        Advance(u16),
    }

    fn op(n: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..n, 0u8..4, 0u8..4, -5i64..5).prop_map(|(node, state, key, value)| Op::Edit { node, state, key, value }),
            3 => (1u8..20).prop_map(Op::Deliver),
            1 => (1u16..3000).prop_map(Op::Advance),
        ]
    }

    fn scenario() -> impl Strategy<Value = (usize, u64, u8, u8, Vec<Op>)> {
        (3usize..=5).prop_flat_map(|n| {
            (
                Just(n),
                any::<u64>(),
                0u8..40,
                0u8..30,
                proptest::collection::vec(op(n), 1..60),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Random entity edits on 3-5 replicas under drop, duplicate and
        /// reorder, using push with fallback; after reliable delivery every
        /// replica has the same heads and the same typed view.
        #[test]
        fn replicas_converge_under_drop_duplicate_and_reorder((n, seed, drop_pct, dup_pct, ops) in scenario()) {
            let mut net = Net::new(n, seed, EngineConfig::default());
            net.share_entity(DOC);
            net.run_until_quiet(100_000);
            net.faults = Faults { drop_pct, dup_pct, reorder: true };
            for op in ops {
                match op {
                    Op::Edit { node, state, key, value } => {
                        let u = update(&format!("s{state}"), json!({ format!("k{key}"): value }));
                        net.edit(node, DOC, &u, Some(format!("c{node}")));
                    }
                    Op::Deliver(k) => {
                        for _ in 0..k {
                            net.step();
                        }
                    }
                    Op::Advance(ms) => net.advance(u64::from(ms)),
                }
            }
            net.faults = Faults::RELIABLE;
            net.run_until_quiet(200_000);
            net.assert_converged(DOC);
        }

        /// Arbitrary bytes as push and sync payloads, and as saved sync
        /// states, never panic and never disturb the document.
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), sync_prefix in any::<bool>()) {
            let mut net = synced(2);
            let before = net.nodes[0].heads(DOC).unwrap();
            let epoch = KeyEpoch::first([0; 16]);
            let mut payload = bytes.clone();
            if sync_prefix {
                payload.insert(0, 0x42);
            }
            let node = &mut net.nodes[0];
            let cfg = EngineConfig::default();
            let push = Frame::Push(Push { doc: DOC, epoch, correlation_id: None, bytes: payload.clone() });
            let sync = Frame::Sync(SyncMessage { doc: DOC, epoch, expects_reply: true, bytes: payload.clone() });
            let _ = crate::engine::payload_actors(&push, &cfg);
            let _ = crate::engine::payload_actors(&sync, &cfg);
            let _ = node.receive(1, push, 5);
            let _ = node.receive(1, sync, 5);
            let _ = node.attach(1, DOC, Some(&bytes), 5);
            let _ = node.load_document(DocId::from_bytes([3; 16]), std::slice::from_ref(&bytes));
            prop_assert_eq!(node.stats().panics_caught, 0);
            prop_assert_eq!(net.nodes[0].heads(DOC).unwrap(), before);
        }

        /// Single-byte corruptions of real sync messages never panic.
        #[test]
        fn corrupted_sync_messages_never_panic(at in any::<usize>(), byte in any::<u8>()) {
            let mut net = Net::new(2, 11, EngineConfig::default());
            net.share_entity(DOC);
            let m = net.in_flight.iter().find(|m| m.from == 0).map(|m| m.bytes.clone()).unwrap();
            let Frame::Sync(mut s) = wire::decode(&m, WIRE_CAP).unwrap() else { panic!("expected sync") };
            let i = at % s.bytes.len();
            s.bytes[i] = byte;
            let _ = net.nodes[1].receive(0, Frame::Sync(s), 5);
            prop_assert_eq!(net.nodes[1].stats().panics_caught, 0);
        }
    }

    /// Found by the `receive` fuzz target: a peer's bloom filter with entries
    /// but no bits made Automerge divide by zero while generating the reply.
    #[test]
    fn hostile_bloom_filters_are_refused_before_automerge_sees_them() {
        let input = include_bytes!("../testdata/sync-bloom-zero-bits.bin");
        let mut net = synced(2);
        let frame = Frame::Sync(SyncMessage {
            doc: DOC,
            epoch: KeyEpoch::first([0; 16]),
            expects_reply: input[0] & 2 != 0,
            bytes: input[1..].to_vec(),
        });
        let err = net.nodes[0].receive(1, frame, 5).unwrap_err();
        assert!(
            matches!(&err, Error::Sync { reason, .. } if reason.contains("bloom")),
            "{err}"
        );
        assert_eq!(net.nodes[0].stats().panics_caught, 0);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    /// Found by the `receive` fuzz target: Automerge registers an actor only
    /// from its first change and panics on a later change from an actor it
    /// has not seen. Such changes are refused before they reach it.
    #[test]
    fn changes_from_unseen_actors_are_refused_unless_introduced() {
        use crate::engine::check_actors;
        let mut other = AutoCommit::new().with_actor(automerge::ActorId::from([8u8; 16]));
        let mut changes = Vec::new();
        for i in 0..2_i64 {
            other.put(ROOT, "n", i).unwrap();
            other.commit();
            changes.extend(crate::chunks::parse_changes(&other.save_incremental(), 4).unwrap());
        }
        let known = std::collections::BTreeSet::new();
        let second = &changes[1..];
        assert!(
            check_actors(second, second, &known)
                .unwrap_err()
                .contains("not seen")
        );
        assert!(
            check_actors(&changes, &changes, &known).is_ok(),
            "introduced by its first change"
        );
        let known: std::collections::BTreeSet<_> = [automerge::ActorId::from([8u8; 16])].into();
        assert!(check_actors(second, second, &known).is_ok());
    }

    #[test]
    fn a_doc_with_an_incompatible_change_is_reported_not_fatal() {
        // A change from a foreign document touching `entity` with a list:
        // applying it must be an error value or a schema error, never a panic.
        let mut net = synced(2);
        let mut other = AutoCommit::new();
        other
            .put_object(ROOT, "entity", automerge::ObjType::List)
            .unwrap();
        other.commit();
        let bytes = other.save_incremental();
        let frame = Frame::Push(Push {
            doc: DOC,
            epoch: KeyEpoch::first([0; 16]),
            correlation_id: None,
            bytes,
        });
        let out = net.nodes[1].receive(0, frame, 5).unwrap();
        // Which `entity` wins the conflict depends on op ids; either way the
        // change is applied and reading reports a value or a schema error.
        assert!(out.iter().any(|o| matches!(o, Output::Changed { .. })));
        match net.nodes[1].entity(DOC) {
            Ok(_) | Err(Error::Schema { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(other.get(ROOT, "entity").unwrap().is_some());
    }
    /// Attributes of `len` characters from the printable ASCII range, drawn from `rng`,
    /// so that Automerge's deflated columns cannot shrink a catch-up under the cap.
    fn noise(rng: &mut super::Rng, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b' ' + (rng.below(95) as u8)))
            .collect()
    }

    /// Node 0 writes `writes` updates of `each` bytes before node 1 has the document.
    fn written_before_joining(config: EngineConfig, writes: usize, each: usize) -> Net {
        let mut net = Net::new(2, 11, config);
        let epoch = KeyEpoch::first([0; 16]);
        let out = net.nodes[0]
            .create_entity(
                DOC,
                "home-1",
                epoch,
                "camera.big",
                &update("idle", json!({})),
                1,
            )
            .unwrap();
        net.absorb(0, out);
        let mut rng = super::Rng::new(5);
        for i in 0..writes {
            let text = noise(&mut rng, each);
            net.edit(
                0,
                DOC,
                &update("rec", json!({ format!("part{i}"): text })),
                None,
            );
        }
        net
    }

    fn join(net: &mut Net) {
        let epoch = KeyEpoch::first([0; 16]);
        net.nodes[1].expect_document(DOC, DocKind::Entity, "home-1", epoch);
        for (a, b) in [(0, 1), (1, 0)] {
            let out = net.nodes[a].attach(b, DOC, None, net.now_ms).unwrap();
            net.absorb(a, out);
        }
    }

    #[test]
    fn a_catch_up_larger_than_one_sync_message_arrives_over_several() {
        const CAP: usize = 64 * 1024;
        let config = EngineConfig {
            max_sync_message_bytes: CAP,
            ..EngineConfig::default()
        };
        // 24 writes of 8 KB: three times the cap, whole or as changes.
        let mut net = written_before_joining(config, 24, 8 * 1024);
        join(&mut net);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        let view = net.nodes[1].entity(DOC).unwrap();
        assert!(view.attributes.contains_key("part23"), "{:?}", view.state);
        let sender = net.nodes[0].stats();
        assert!(sender.sync_partial >= 2, "{sender:?}");
        assert_eq!(sender.oversized, 0);
        assert_eq!(net.nodes[1].stats().oversized, 0);
        assert_eq!(net.stats.receive_errors, 0);
        assert!(net.stats.largest_payload <= CAP, "{:?}", net.stats);
        assert!(net.nodes[0].is_in_sync(&1, DOC) && net.nodes[1].is_in_sync(&0, DOC));

        // Later, a peer that holds part of the document misses more than the cap while
        // detached: the changes it lacks come in capped rounds too, under loss.
        let saved = net.nodes[0].detach(&1, DOC);
        net.nodes[1].detach(&0, DOC);
        let mut rng = super::Rng::new(9);
        for i in 0..20 {
            let text = noise(&mut rng, 8 * 1024);
            net.edit(
                0,
                DOC,
                &update("rec", json!({ format!("more{i}"): text })),
                None,
            );
        }
        net.faults = Faults {
            drop_pct: 10,
            dup_pct: 10,
            reorder: true,
        };
        let out = net.nodes[0]
            .attach(1, DOC, saved.as_deref(), net.now_ms)
            .unwrap();
        net.absorb(0, out);
        let out = net.nodes[1].attach(0, DOC, None, net.now_ms).unwrap();
        net.absorb(1, out);
        net.run_until_quiet(20_000);
        net.faults = Faults::RELIABLE;
        net.advance(10_000);
        net.run_until_quiet(20_000);
        net.assert_converged(DOC);
        assert!(
            net.nodes[1]
                .entity(DOC)
                .unwrap()
                .attributes
                .contains_key("more19")
        );
        assert!(net.stats.largest_payload <= CAP, "{:?}", net.stats);
        assert_eq!(net.nodes[0].stats().oversized, 0);
    }

    #[test]
    fn a_single_change_over_the_cap_is_counted_once_per_retry() {
        const CAP: usize = 16 * 1024;
        let config = EngineConfig {
            max_sync_message_bytes: CAP,
            ..EngineConfig::default()
        };
        let retry = config.retry_after_ms;
        let mut net = written_before_joining(config, 1, 32 * 1024);
        join(&mut net);
        // The waiting side asks again after each retry period; every answer that cannot
        // be sent is counted, and nothing over the cap goes out.
        while net.step() {}
        let first = net.nodes[0].stats().oversized;
        assert!((1..=2).contains(&first), "{first}");
        for _ in 0..3 {
            net.advance(retry);
            while net.step() {}
        }
        // A couple per retry period, not one per step.
        let oversized = net.nodes[0].stats().oversized;
        assert!(oversized > first && oversized <= first + 6, "{oversized}");
        assert!(net.stats.largest_payload <= CAP);
        assert_eq!(net.stats.receive_errors, 0);
        assert_ne!(
            net.nodes[1].heads(DOC).unwrap(),
            net.nodes[0].heads(DOC).unwrap()
        );
    }
}
