//! Convergence of every document kind beyond the entity basics: rooms (joins
//! up to `max_size`, chat, activity scores, playback), presence, locks,
//! sessions, and entities under each conflict policy, on the simulated
//! network of [`crate::harness`].
//!
//! Also [`Cluster`], a reliable in-order network that keeps the
//! [`Output::Conflict`] audit records each node emits, for the policy and
//! history tests.

use std::collections::VecDeque;

use crate::engine::{Engine, EngineConfig, Output};
use crate::harness::Net;
use crate::ids::{DocId, KeyEpoch, actor_for_peer};
use crate::policy::{ConflictRecord, Policy};
use crate::schema::DocKind;
use crate::schema::entity::EntityUpdate;
use crate::wire;

/// Key epoch used by every test document.
pub(crate) const EPOCH: KeyEpoch = KeyEpoch::first([0; 16]);

/// Owner home of the test documents.
pub(crate) const OWNER: &str = "home-1";

/// A reliable network of engines that delivers frames in order and records
/// the conflict audit records every node emits.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<Engine<usize>>,
    queue: VecDeque<(usize, usize, Vec<u8>)>,
    /// Audit records per node, in emission order.
    pub(crate) records: Vec<Vec<ConflictRecord>>,
    pub(crate) now_ms: u64,
}

impl Cluster {
    /// `n` nodes named `peer-0`...; node `i` belongs to `homes[i]` in every
    /// node's actor-to-home mapping.
    pub(crate) fn new(homes: &[&str]) -> Self {
        let mut nodes: Vec<Engine<usize>> = (0..homes.len())
            .map(|i| Engine::new(format!("peer-{i}").as_bytes(), EngineConfig::default()))
            .collect();
        for node in &mut nodes {
            for (i, home) in homes.iter().enumerate() {
                let actor = actor_for_peer(format!("peer-{i}").as_bytes());
                node.actor_homes_mut().insert(actor, *home);
            }
        }
        Self {
            nodes,
            queue: VecDeque::new(),
            records: vec![Vec::new(); homes.len()],
            now_ms: 1_000,
        }
    }

    pub(crate) fn absorb(&mut self, from: usize, outputs: Vec<Output<usize>>) {
        for o in outputs {
            match o {
                Output::Send { peer, frame } => {
                    self.queue.push_back((from, peer, wire::encode(&frame)));
                }
                Output::Conflict(r) => self.records[from].push(r),
                _ => {}
            }
        }
    }

    /// Node 0 creates an entity under `policy`; every node attaches to every
    /// other; the network settles.
    pub(crate) fn share_entity(&mut self, doc: DocId, policy: Policy) {
        let first = EntityUpdate {
            state: "off".into(),
            attributes: None,
        };
        let now = self.now_ms;
        let out = self.nodes[0]
            .create_entity(doc, OWNER, EPOCH, "light.test", &first, now)
            .unwrap();
        self.absorb(0, out);
        let out = self.nodes[0]
            .set_entity_policy(doc, policy, now, None)
            .unwrap();
        self.absorb(0, out);
        self.attach_all(doc, DocKind::Entity);
    }

    /// Takes node 0's outputs of creating `doc` and attaches it on every node.
    pub(crate) fn created(&mut self, doc: DocId, kind: DocKind, out: Vec<Output<usize>>) {
        self.absorb(0, out);
        self.attach_all(doc, kind);
    }

    /// Every other node expects `doc`, and every pair attaches.
    pub(crate) fn attach_all(&mut self, doc: DocId, kind: DocKind) {
        for i in 1..self.nodes.len() {
            self.nodes[i].expect_document(doc, kind, OWNER, EPOCH);
        }
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    let out = self.nodes[a].attach(b, doc, None, self.now_ms).unwrap();
                    self.absorb(a, out);
                }
            }
        }
        self.settle();
    }

    /// Delivers everything and runs timers until the network is quiet.
    pub(crate) fn settle(&mut self) {
        for _ in 0..100_000 {
            if let Some((from, to, bytes)) = self.queue.pop_front() {
                let frame = wire::decode(&bytes, wire::DEFAULT_MAX_FRAME_BYTES).unwrap();
                let out = self.nodes[to].receive(from, frame, self.now_ms).unwrap();
                self.absorb(to, out);
                continue;
            }
            let Some(at) = self.nodes.iter().filter_map(|n| n.next_deadline()).min() else {
                return;
            };
            self.now_ms = self.now_ms.max(at);
            for i in 0..self.nodes.len() {
                let out = self.nodes[i].tick(self.now_ms);
                self.absorb(i, out);
            }
        }
        panic!("cluster did not settle");
    }

    /// Writes an entity update on `node` at the current time plus `dt_ms`,
    /// without delivering it.
    pub(crate) fn write(&mut self, node: usize, doc: DocId, update: &EntityUpdate, dt_ms: u64) {
        let out = self.nodes[node]
            .update_entity(doc, update, self.now_ms + dt_ms, None)
            .unwrap();
        self.absorb(node, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::harness::Faults;
    use crate::policy::Field;
    use crate::schema::locks::{Lock, LockType};
    use crate::schema::presence::{PresenceStatus, PresenceUpdate};
    use crate::schema::room::{ActivityState, NewMessage, NewRoom, Playback};
    use crate::schema::session::HandoffOutcome;
    use proptest::prelude::*;
    use serde_json::json;

    const ROOM: DocId = DocId::from_bytes([11; 16]);
    const PRESENCE: DocId = DocId::from_bytes([12; 16]);
    const LOCKS: DocId = DocId::from_bytes([13; 16]);
    const SESSION: DocId = DocId::from_bytes([14; 16]);
    const ENTITY: DocId = DocId::from_bytes([15; 16]);
    const MAX_SIZE: u64 = 3;
    const USERS: [&str; 6] = ["ann", "bob", "cat", "dan", "eve", "fay"];
    const DEVICES: [&str; 2] = ["tv", "lamp"];

    /// Node 0 creates `doc` with `create`; the others expect it; all attach.
    fn share(
        net: &mut Net,
        doc: DocId,
        kind: DocKind,
        create: impl FnOnce(&mut Engine<usize>, u64) -> crate::Result<Vec<Output<usize>>>,
    ) {
        let out = create(&mut net.nodes[0], net.now_ms).unwrap();
        net.absorb(0, out);
        for i in 1..net.nodes.len() {
            net.nodes[i].expect_document(doc, kind, OWNER, EPOCH);
        }
        for a in 0..net.nodes.len() {
            for b in 0..net.nodes.len() {
                if a != b {
                    let out = net.nodes[a].attach(b, doc, None, net.now_ms).unwrap();
                    net.absorb(a, out);
                }
            }
        }
    }

    fn setup(n: usize, seed: u64, policy: Policy) -> Net {
        let mut net = Net::new(n, seed, EngineConfig::default());
        // Node 0 and node 1 are the owner home's devices; the rest belong to
        // a home the entity is shared with. Every node knows the same map.
        for node in &mut net.nodes {
            for i in 0..n {
                let home = if i < 2 { OWNER } else { "home-2" };
                node.actor_homes_mut()
                    .insert(actor_for_peer(format!("peer-{i}").as_bytes()), home);
            }
        }
        let room = NewRoom {
            name: "den".into(),
            creator: USERS[0].into(),
            device: "tv".into(),
            max_size: MAX_SIZE,
        };
        share(&mut net, ROOM, DocKind::Room, |e, now| {
            e.create_room(ROOM, OWNER, EPOCH, &room, now)
        });
        share(&mut net, PRESENCE, DocKind::Presence, |e, now| {
            e.create_presence(PRESENCE, OWNER, EPOCH, now)
        });
        share(&mut net, LOCKS, DocKind::Locks, |e, now| {
            e.create_locks(LOCKS, OWNER, EPOCH, now)
        });
        share(&mut net, SESSION, DocKind::Session, |e, now| {
            e.create_session(SESSION, OWNER, EPOCH, USERS[0], "tv", now)
        });
        share(&mut net, ENTITY, DocKind::Entity, |e, now| {
            let first = EntityUpdate {
                state: "off".into(),
                attributes: Some(
                    json!({"color": {"r": 0, "g": 0, "b": 0}})
                        .as_object()
                        .cloned()
                        .unwrap(),
                ),
            };
            let mut out = e.create_entity(ENTITY, OWNER, EPOCH, "light.den", &first, now)?;
            out.extend(e.set_entity_policy(ENTITY, policy, now, None)?);
            Ok(out)
        });
        net.run_until_quiet(100_000);
        net
    }

    /// One step of the property.
    #[derive(Clone, Debug)]
    enum Op {
        Join {
            node: usize,
            user: usize,
        },
        Leave {
            node: usize,
            user: usize,
        },
        Say {
            node: usize,
            user: usize,
            text: u8,
        },
        StartActivity {
            node: usize,
        },
        Score {
            node: usize,
            user: usize,
            delta: i8,
        },
        Step {
            node: usize,
            step: u8,
        },
        Play {
            node: usize,
            position: u16,
            paused: bool,
        },
        Presence {
            node: usize,
            user: usize,
            status: u8,
        },
        Lock {
            node: usize,
            device: usize,
            kind: u8,
        },
        Release {
            node: usize,
            device: usize,
        },
        Context {
            node: usize,
            value: u8,
        },
        Handoff {
            node: usize,
            device: usize,
        },
        FinishHandoff {
            node: usize,
            complete: bool,
        },
        Edit {
            node: usize,
            state: u8,
            channel: u8,
            value: u8,
        },
        Resolve {
            node: usize,
            pick: u8,
        },
        Deliver(u8),
        Advance(u16),
    }

    fn op(n: usize) -> impl Strategy<Value = Op> {
        let node = 0..n;
        let user = 0..USERS.len();
        prop_oneof![
            1 => (node.clone(), user.clone()).prop_map(|(node, user)| Op::Join { node, user }),
            1 => (node.clone(), user.clone()).prop_map(|(node, user)| Op::Leave { node, user }),
            1 => (node.clone(), user.clone(), any::<u8>())
                .prop_map(|(node, user, text)| Op::Say { node, user, text }),
            1 => node.clone().prop_map(|node| Op::StartActivity { node }),
            1 => (node.clone(), user.clone(), -3i8..5)
                .prop_map(|(node, user, delta)| Op::Score { node, user, delta }),
            1 => (node.clone(), any::<u8>()).prop_map(|(node, step)| Op::Step { node, step }),
            1 => (node.clone(), any::<u16>(), any::<bool>())
                .prop_map(|(node, position, paused)| Op::Play { node, position, paused }),
            1 => (node.clone(), user.clone(), 0u8..3)
                .prop_map(|(node, user, status)| Op::Presence { node, user, status }),
            1 => (node.clone(), 0..DEVICES.len(), 0u8..4)
                .prop_map(|(node, device, kind)| Op::Lock { node, device, kind }),
            1 => (node.clone(), 0..DEVICES.len()).prop_map(|(node, device)| Op::Release { node, device }),
            1 => (node.clone(), any::<u8>()).prop_map(|(node, value)| Op::Context { node, value }),
            1 => (node.clone(), 0..DEVICES.len()).prop_map(|(node, device)| Op::Handoff { node, device }),
            1 => (node.clone(), any::<bool>())
                .prop_map(|(node, complete)| Op::FinishHandoff { node, complete }),
            3 => (node.clone(), 0u8..3, 0u8..3, 0u8..4)
                .prop_map(|(node, state, channel, value)| Op::Edit { node, state, channel, value }),
            1 => (node, any::<u8>()).prop_map(|(node, pick)| Op::Resolve { node, pick }),
            4 => (1u8..20).prop_map(Op::Deliver),
            1 => (1u16..3000).prop_map(Op::Advance),
        ]
    }

    /// Runs one operation. Refusals that a user could cause (a full room, a
    /// non-member speaking, a stale token) are error values and change
    /// nothing; anything else is a failure.
    fn apply(net: &mut Net, op: Op) {
        let now = net.now_ms;
        let result = match op {
            Op::Join { node, user } => {
                let before = net.nodes[node].room(ROOM).unwrap();
                let r = net.nodes[node].join_room(ROOM, USERS[user], "tv", now, None);
                if let Err(Error::RoomFull { max_size }) = &r {
                    assert_eq!(*max_size, MAX_SIZE);
                    assert!(
                        (before.members.len() + before.overflow.len()) as u64 >= MAX_SIZE,
                        "refused a join below the cap"
                    );
                }
                r
            }
            Op::Leave { node, user } => net.nodes[node].leave_room(ROOM, USERS[user], now, None),
            Op::Say { node, user, text } => {
                // Mostly a member as this replica sees it (so chat grows),
                // sometimes anyone (so refusals are exercised too).
                let room = net.nodes[node].room(ROOM).unwrap();
                let sender = match room.members.get(user % room.members.len().max(1)) {
                    Some(m) if text % 4 != 0 => m.user.clone(),
                    _ => USERS[user].to_string(),
                };
                let msg = NewMessage {
                    id: format!("m{node}-{now}-{text}"),
                    sender,
                    text: format!("hello {text}"),
                };
                net.nodes[node].say(ROOM, &msg, now, None).map(|(_, o)| o)
            }
            Op::StartActivity { node } => net.nodes[node].start_activity(ROOM, "quiz", now, None),
            Op::Score { node, user, delta } => {
                net.nodes[node].add_score(ROOM, USERS[user], i64::from(delta), now, None)
            }
            Op::Step { node, step } => {
                let state = if step % 5 == 0 {
                    net.nodes[node].set_activity_state(ROOM, ActivityState::Running, now, None)
                } else {
                    Ok(Vec::new())
                };
                state.and_then(|mut out| {
                    out.extend(net.nodes[node].set_activity_step(
                        ROOM,
                        u64::from(step),
                        now,
                        None,
                    )?);
                    Ok(out)
                })
            }
            Op::Play {
                node,
                position,
                paused,
            } => {
                let p = Playback {
                    media: "film".into(),
                    start_at_ms: now + 500,
                    position_ms: u64::from(position),
                    rate: 1.0,
                    paused,
                };
                net.nodes[node].set_playback(ROOM, Some(&p), now, None)
            }
            Op::Presence { node, user, status } => {
                let update = PresenceUpdate {
                    status: [
                        PresenceStatus::Online,
                        PresenceStatus::Away,
                        PresenceStatus::Busy,
                    ][usize::from(status)],
                    device: format!("dev{node}"),
                    note: (status == 2).then(|| "in a call".to_string()),
                };
                net.nodes[node]
                    .set_presence(PRESENCE, USERS[user], &update, now, None)
                    .map(|(_, o)| o)
            }
            Op::Lock { node, device, kind } => {
                let locks = net.nodes[node].locks(LOCKS).unwrap();
                let lock = Lock {
                    holder: format!("op{node}"),
                    lock_type: LockType::ALL[usize::from(kind)],
                    token: locks.next_token(DEVICES[device]),
                    acquired_at_ms: now,
                    expires_at_ms: now + 60_000,
                    reason: None,
                };
                net.nodes[node].put_lock(LOCKS, DEVICES[device], &lock, now, None)
            }
            Op::Release { node, device } => {
                let locks = net.nodes[node].locks(LOCKS).unwrap();
                let token = locks.devices.get(DEVICES[device]).map_or(1, |l| l.token);
                net.nodes[node]
                    .release_lock(LOCKS, DEVICES[device], token, now, None)
                    .map(|(_, o)| o)
            }
            Op::Context { node, value } => {
                let ctx = json!({ "page": value, "from": node })
                    .as_object()
                    .cloned()
                    .unwrap();
                net.nodes[node].set_session_context(SESSION, &ctx, now, None)
            }
            Op::Handoff { node, device } => net.nodes[node].begin_handoff(
                SESSION,
                &format!("h{now}"),
                DEVICES[device],
                now,
                None,
            ),
            Op::FinishHandoff { node, complete } => {
                let s = net.nodes[node].session(SESSION).unwrap();
                match s.pending_handoff() {
                    Some(h) => {
                        let outcome = if complete {
                            HandoffOutcome::Completed
                        } else {
                            HandoffOutcome::RolledBack
                        };
                        let id = h.id.clone();
                        net.nodes[node]
                            .finish_handoff(SESSION, &id, outcome, now, None)
                            .map(|(_, o)| o)
                    }
                    None => Ok(Vec::new()),
                }
            }
            Op::Edit {
                node,
                state,
                channel,
                value,
            } => {
                let mut color = json!({"r": 0, "g": 0, "b": 0});
                color[["r", "g", "b"][usize::from(channel)]] = json!(value);
                let update = EntityUpdate {
                    state: format!("s{state}"),
                    attributes: json!({ "color": color, "level": value })
                        .as_object()
                        .cloned(),
                };
                net.nodes[node].update_entity(ENTITY, &update, now, None)
            }
            Op::Resolve { node, pick } => {
                let resolved = net.nodes[node].resolved_entity(ENTITY).unwrap();
                match resolved.conflicts.first() {
                    Some(c) => {
                        let choice = usize::from(pick) % c.candidates.len();
                        let field = c.field.clone();
                        net.nodes[node]
                            .resolve_conflict(ENTITY, &field, choice, now, None)
                            .map(|(_, o)| o)
                    }
                    None => Ok(Vec::new()),
                }
            }
            Op::Deliver(k) => {
                for _ in 0..k {
                    net.step();
                }
                Ok(Vec::new())
            }
            Op::Advance(ms) => {
                net.advance(u64::from(ms));
                Ok(Vec::new())
            }
        };
        match result {
            Ok(out) => {
                let from = match op_node(&op) {
                    Some(n) => n,
                    None => return,
                };
                net.absorb(from, out);
            }
            Err(Error::RoomFull { .. } | Error::NotMember { .. } | Error::Refused { .. }) => {}
            Err(e) => panic!("{op:?} failed: {e}"),
        }
    }

    fn op_node(op: &Op) -> Option<usize> {
        match *op {
            Op::Join { node, .. }
            | Op::Leave { node, .. }
            | Op::Say { node, .. }
            | Op::StartActivity { node }
            | Op::Score { node, .. }
            | Op::Step { node, .. }
            | Op::Play { node, .. }
            | Op::Presence { node, .. }
            | Op::Lock { node, .. }
            | Op::Release { node, .. }
            | Op::Context { node, .. }
            | Op::Handoff { node, .. }
            | Op::FinishHandoff { node, .. }
            | Op::Edit { node, .. }
            | Op::Resolve { node, .. } => Some(node),
            Op::Deliver(_) | Op::Advance(_) => None,
        }
    }

    /// Every replica has the same heads and the same typed views of every
    /// document, the entity as its policy resolves it included.
    fn assert_all_converged(net: &mut Net) {
        for doc in [ROOM, PRESENCE, LOCKS, SESSION, ENTITY] {
            let heads = net.nodes[0].heads(doc).unwrap();
            for i in 1..net.nodes.len() {
                assert_eq!(
                    net.nodes[i].heads(doc).unwrap(),
                    heads,
                    "heads of {doc} on node {i}"
                );
            }
        }
        let room = net.nodes[0].room(ROOM).unwrap();
        assert!(room.members.len() as u64 <= room.max_size);
        let chat = net.nodes[0].room_chat(ROOM, usize::MAX).unwrap();
        assert_eq!(
            chat.len(),
            room.chat_len.min(crate::schema::room::MAX_CHAT_READ)
        );
        let presence = net.nodes[0].presence(PRESENCE).unwrap();
        let locks = net.nodes[0].locks(LOCKS).unwrap();
        let session = net.nodes[0].session(SESSION).unwrap();
        let entity = net.nodes[0].resolved_entity(ENTITY).unwrap();
        for (i, n) in net.nodes.iter().enumerate().skip(1) {
            assert_eq!(n.room(ROOM).unwrap(), room, "room on node {i}");
            assert_eq!(
                n.room_chat(ROOM, usize::MAX).unwrap(),
                chat,
                "chat on node {i}"
            );
            assert_eq!(
                n.presence(PRESENCE).unwrap(),
                presence,
                "presence on node {i}"
            );
            assert_eq!(n.locks(LOCKS).unwrap(), locks, "locks on node {i}");
            assert_eq!(n.session(SESSION).unwrap(), session, "session on node {i}");
            assert_eq!(
                n.resolved_entity(ENTITY).unwrap(),
                entity,
                "entity on node {i}"
            );
        }
        // A decided conflict shows its chosen value; a pending one its newest.
        for c in &entity.conflicts {
            let shown = match &c.field {
                Field::State => serde_json::Value::String(entity.entity.state.clone()),
                Field::Attribute(k) => entity.entity.attributes[k].clone(),
            };
            let expected = c
                .chosen
                .clone()
                .unwrap_or_else(|| c.candidates[0].value.clone());
            assert_eq!(shown, expected, "{}", c.field);
            assert_eq!(c.chosen.is_none(), entity.policy == Policy::UserChoice);
        }
    }

    fn scenario() -> impl Strategy<Value = (usize, u64, u8, u8, usize, Vec<Op>)> {
        (3usize..=4).prop_flat_map(|n| {
            (
                Just(n),
                any::<u64>(),
                0u8..30,
                0u8..20,
                0..Policy::ALL.len(),
                proptest::collection::vec(op(n), 1..80),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        /// Random room, presence, lock, session and entity edits on 3-4
        /// replicas under drop, duplicate and reorder; after reliable
        /// delivery every replica shows the same views, under every policy.
        #[test]
        fn every_document_kind_converges((n, seed, drop_pct, dup_pct, policy, ops) in scenario()) {
            let mut net = setup(n, seed, Policy::ALL[policy]);
            net.faults = Faults { drop_pct, dup_pct, reorder: true };
            for op in ops {
                apply(&mut net, op);
            }
            net.faults = Faults::RELIABLE;
            net.run_until_quiet(400_000);
            assert_all_converged(&mut net);
        }
    }

    #[test]
    fn malformed_content_from_a_peer_is_an_error_value_for_every_kind() {
        use automerge::transaction::Transactable;
        use automerge::{AutoCommit, ROOT, ReadDoc, ScalarValue};

        let mut c = Cluster::new(&[OWNER, OWNER]);
        let now = c.now_ms;
        let room = NewRoom {
            name: "den".into(),
            creator: "ann".into(),
            device: "tv".into(),
            max_size: 4,
        };
        let out = c.nodes[0]
            .create_room(ROOM, OWNER, EPOCH, &room, now)
            .unwrap();
        c.created(ROOM, DocKind::Room, out);
        let out = c.nodes[0]
            .create_presence(PRESENCE, OWNER, EPOCH, now)
            .unwrap();
        c.created(PRESENCE, DocKind::Presence, out);
        let out = c.nodes[0].create_locks(LOCKS, OWNER, EPOCH, now).unwrap();
        c.created(LOCKS, DocKind::Locks, out);
        let out = c.nodes[0]
            .create_session(SESSION, OWNER, EPOCH, "ann", "tv", now)
            .unwrap();
        c.created(SESSION, DocKind::Session, out);

        type Breaker = fn(&mut AutoCommit);
        let cases: [(DocId, Breaker, &str); 4] = [
            (
                ROOM,
                |d| {
                    let (_, r) = d.get(ROOT, "room").unwrap().unwrap();
                    d.put(&r, "max_size", "lots").unwrap();
                },
                "room.max_size",
            ),
            (
                PRESENCE,
                |d| {
                    let (_, p) = d.get(ROOT, "presence").unwrap().unwrap();
                    let (_, u) = d.get(&p, "users").unwrap().unwrap();
                    let e = d.put_object(&u, "ann", automerge::ObjType::Map).unwrap();
                    d.put(&e, "status", "offline").unwrap();
                    d.put(&e, "device", "tv").unwrap();
                    d.put(&e, "since", ScalarValue::Uint(1)).unwrap();
                },
                "presence.users.ann.status",
            ),
            (
                LOCKS,
                |d| {
                    let (_, l) = d.get(ROOT, "locks").unwrap().unwrap();
                    let (_, t) = d.get(&l, "tokens").unwrap().unwrap();
                    d.put(&t, "tv", "seven").unwrap();
                },
                "locks.tokens.tv",
            ),
            (
                SESSION,
                |d| {
                    let (_, s) = d.get(ROOT, "session").unwrap().unwrap();
                    d.put(&s, "context", "[]").unwrap();
                },
                "session.context",
            ),
        ];
        for (doc, breaker, expected) in cases {
            let (_, out) = c.nodes[1]
                .transact(doc, c.now_ms, None, |d, _, _| {
                    breaker(d);
                    Ok(())
                })
                .unwrap();
            let mut reported = Vec::new();
            for o in out {
                if let Output::Send { peer: 0, frame } = o {
                    for r in c.nodes[0].receive(1, frame, c.now_ms).unwrap() {
                        if let Output::Changed {
                            schema_error: Some(e),
                            ..
                        } = r
                        {
                            reported.push(e);
                        }
                    }
                }
            }
            assert!(
                matches!(&reported[..], [Error::Schema { path, .. }] if path == expected),
                "{expected}: {reported:?}"
            );
            let read = match doc {
                ROOM => c.nodes[0].room(doc).map(drop),
                PRESENCE => c.nodes[0].presence(doc).map(drop),
                LOCKS => c.nodes[0].locks(doc).map(drop),
                _ => c.nodes[0].session(doc).map(drop),
            };
            assert!(
                matches!(&read, Err(Error::Schema { path, .. }) if path == expected),
                "{read:?}"
            );
        }
        assert_eq!(c.nodes[0].stats().schema_violations, 4);
        // A view write does not land in a document of another kind.
        let err = c.nodes[0]
            .join_room(PRESENCE, "bob", "tv", now, None)
            .unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err}");
        c.settle();
    }

    /// The device records are read once per change of the home document: a revocation,
    /// written here or by a peer, shows in the next read.
    #[test]
    fn device_records_read_after_a_change_hold_it() {
        use crate::schema::home::{self, DeviceRecord};

        const HOME: DocId = DocId::from_bytes([23; 16]);
        let mut c = Cluster::new(&[OWNER, OWNER]);
        let now = c.now_ms;
        let out = c.nodes[0]
            .create_home(HOME, OWNER, EPOCH, "h", now)
            .unwrap();
        c.created(HOME, DocKind::Home, out);
        let record = DeviceRecord {
            name: "kitchen".into(),
            certificate: vec![1, 2, 3],
            revoked_at: None,
        };
        let write = |c: &mut Cluster, node: usize, f: &dyn Fn(&mut automerge::AutoCommit)| {
            let (_, out) = c.nodes[node]
                .transact(HOME, c.now_ms, None, |d, _, _| {
                    f(d);
                    Ok(())
                })
                .unwrap();
            c.absorb(node, out);
            c.settle();
        };
        write(&mut c, 0, &|d| {
            home::put_device(d, "peerK", &record).unwrap()
        });
        for node in 0..2 {
            let devices = c.nodes[node].home_devices(HOME).unwrap();
            assert_eq!(devices["peerK"].revoked_at, None);
            // Read again with no change between: the same records.
            assert_eq!(c.nodes[node].home_devices(HOME).unwrap(), devices);
        }
        // Node 1 revokes; node 0 learns it by sync, node 1 by its own write.
        write(&mut c, 1, &|d| home::revoke_device(d, "peerK", 77).unwrap());
        for node in 0..2 {
            let devices = c.nodes[node].home_devices(HOME).unwrap();
            assert_eq!(devices["peerK"].revoked_at, Some(77), "node {node}");
        }
        // A failed write leaves nothing behind, and the records stay as they were.
        assert!(
            c.nodes[0]
                .transact(HOME, c.now_ms, None, |d, _, _| {
                    home::revoke_device(d, "peerK", 99)?;
                    home::revoke_device(d, "nobody", 99)
                })
                .is_err()
        );
        assert_eq!(
            c.nodes[0].home_devices(HOME).unwrap()["peerK"].revoked_at,
            Some(77)
        );
    }

    /// Home and registry documents are validated by the entries each change wrote once
    /// they validated whole; a malformed entry from a peer must still be reported with
    /// its path, also after earlier good changes, and keep being reported until repaired.
    #[test]
    fn malformed_entries_of_big_collections_are_caught_after_good_changes() {
        use crate::schema::{home, registry};
        use automerge::transaction::Transactable;
        use automerge::{ROOT, ReadDoc, ScalarValue};

        const HOME: DocId = DocId::from_bytes([21; 16]);
        const REGISTRY: DocId = DocId::from_bytes([22; 16]);
        let mut c = Cluster::new(&[OWNER, OWNER]);
        let now = c.now_ms;
        let out = c.nodes[0]
            .create_home(HOME, OWNER, EPOCH, "h", now)
            .unwrap();
        c.created(HOME, DocKind::Home, out);
        let out = c.nodes[0]
            .create_registry(REGISTRY, OWNER, EPOCH, now)
            .unwrap();
        c.created(REGISTRY, DocKind::Registry, out);

        // Writes `f` on node 1, delivers it to node 0, returns the schema errors reported.
        let step = |c: &mut Cluster, doc: DocId, f: &dyn Fn(&mut automerge::AutoCommit)| {
            let (_, out) = c.nodes[1]
                .transact(doc, c.now_ms, None, |d, _, _| {
                    f(d);
                    Ok(())
                })
                .unwrap();
            let mut reported = Vec::new();
            for o in out {
                if let Output::Send { peer: 0, frame } = o {
                    for r in c.nodes[0].receive(1, frame, c.now_ms).unwrap() {
                        if let Output::Changed { schema_error, .. } = r {
                            reported.push(schema_error);
                        }
                    }
                }
            }
            reported
        };
        let good_key = |n: u8| {
            move |d: &mut automerge::AutoCommit| {
                let target = DocId::from_bytes([n; 16]);
                home::put_wrapped_key(d, target, &EPOCH, "peerB", &[n; 8]).unwrap();
            }
        };
        for n in [1, 2, 3] {
            assert!(matches!(&step(&mut c, HOME, &good_key(n))[..], [None]));
        }
        let bad = DocId::from_bytes([4; 16]);
        let bad_key = move |d: &mut automerge::AutoCommit| {
            home::put_wrapped_key(d, bad, &EPOCH, "peerB", &[1]).unwrap();
            let (_, h) = d.get(ROOT, "home").unwrap().unwrap();
            let (_, k) = d.get(&h, "keyring").unwrap().unwrap();
            let (_, e) = d.get(&k, bad.to_string().as_str()).unwrap().unwrap();
            let (_, w) = d
                .get(&e, home::epoch_key(&EPOCH).as_str())
                .unwrap()
                .unwrap();
            d.put(&w, "peerB", "not bytes").unwrap();
        };
        let path = format!("home.keyring.{bad}.{}.peerB", home::epoch_key(&EPOCH));
        let reported = step(&mut c, HOME, &bad_key);
        assert!(
            matches!(&reported[..], [Some(Error::Schema { path: p, .. })] if *p == path),
            "{reported:?}"
        );
        // A later good change elsewhere does not hide the standing error.
        let reported = step(&mut c, HOME, &good_key(5));
        assert!(
            matches!(&reported[..], [Some(Error::Schema { path: p, .. })] if *p == path),
            "{reported:?}"
        );
        // Repairing the entry clears it.
        let repair = move |d: &mut automerge::AutoCommit| {
            home::put_wrapped_key(d, bad, &EPOCH, "peerB", &[1]).unwrap();
        };
        assert!(matches!(&step(&mut c, HOME, &repair)[..], [None]));

        let put = |id: &'static str| {
            move |d: &mut automerge::AutoCommit| {
                registry::put_entity(d, id, DocId::from_bytes([9; 16])).unwrap();
            }
        };
        assert!(matches!(
            &step(&mut c, REGISTRY, &put("light.a"))[..],
            [None]
        ));
        assert!(matches!(
            &step(&mut c, REGISTRY, &put("light.b"))[..],
            [None]
        ));
        let reported = step(&mut c, REGISTRY, &|d| {
            let (_, r) = d.get(ROOT, "registry").unwrap().unwrap();
            let (_, ents) = d.get(&r, "entities").unwrap().unwrap();
            let (_, e) = d.get(&ents, "light.a").unwrap().unwrap();
            d.put(&e, "deleted_at", ScalarValue::Uint(3)).unwrap();
        });
        assert!(
            matches!(&reported[..], [Some(Error::Schema { path, .. })] if path == "registry.entities.light.a.deleted_at"),
            "{reported:?}"
        );
        assert!(c.nodes[0].registry(REGISTRY).is_err());
    }

    #[test]
    fn joins_stop_at_max_size_and_concurrent_overflow_is_settled_alike() {
        let mut net = setup(3, 1, Policy::LatestWins);
        let now = net.now_ms;
        // The creator holds one place; two more fill the room.
        for user in ["bob", "cat"] {
            let out = net.nodes[0].join_room(ROOM, user, "tv", now, None).unwrap();
            net.absorb(0, out);
        }
        let err = net.nodes[0]
            .join_room(ROOM, "dan", "tv", now, None)
            .unwrap_err();
        assert!(matches!(err, Error::RoomFull { max_size: 3 }), "{err}");
        net.run_until_quiet(100_000);
        // Two replicas free a place and fill it concurrently.
        let out = net.nodes[0].leave_room(ROOM, "cat", now, None).unwrap();
        net.absorb(0, out);
        net.run_until_quiet(100_000);
        let out = net.nodes[1]
            .join_room(ROOM, "dan", "tv", now + 1, None)
            .unwrap();
        net.absorb(1, out);
        let out = net.nodes[2]
            .join_room(ROOM, "eve", "lamp", now + 2, None)
            .unwrap();
        net.absorb(2, out);
        net.run_until_quiet(100_000);
        assert_all_converged(&mut net);
        let room = net.nodes[0].room(ROOM).unwrap();
        let members: Vec<_> = room.members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(
            members,
            ["ann", "bob", "dan"],
            "the earlier join keeps the place"
        );
        assert_eq!(room.overflow.len(), 1);
        assert_eq!(room.overflow[0].user, "eve");
        // The overflowed member is not admitted: they cannot speak.
        let msg = NewMessage {
            id: "x1".into(),
            sender: "eve".into(),
            text: "hi".into(),
        };
        let err = net.nodes[2].say(ROOM, &msg, now, None).unwrap_err();
        assert!(
            matches!(&err, Error::NotMember { user } if user == "eve"),
            "{err}"
        );
    }

    #[test]
    fn concurrent_score_increments_all_count() {
        let mut net = setup(3, 2, Policy::LatestWins);
        let now = net.now_ms;
        let out = net.nodes[0]
            .join_room(ROOM, "bob", "tv", now, None)
            .unwrap();
        net.absorb(0, out);
        let out = net.nodes[0]
            .start_activity(ROOM, "quiz", now, None)
            .unwrap();
        net.absorb(0, out);
        net.run_until_quiet(100_000);
        for (node, delta) in [(0, 3), (1, 4), (2, 5)] {
            let out = net.nodes[node]
                .add_score(ROOM, "bob", delta, now, None)
                .unwrap();
            net.absorb(node, out);
        }
        net.run_until_quiet(100_000);
        assert_all_converged(&mut net);
        let activity = net.nodes[1].room(ROOM).unwrap().activity.unwrap();
        assert_eq!(activity.scores["bob"], 12);
        assert_eq!(activity.scores["ann"], 0);
        assert_eq!(activity.state, ActivityState::Starting);
    }

    /// A remote registry change names the entries it wrote (a new entry, a share, a
    /// tombstone), so a device can update its index by them; the registry's creation
    /// writes above the entries and names everything.
    #[test]
    fn registry_changes_name_the_entries_they_wrote() {
        use crate::schema::registry::{self, Share};
        use crate::schema::touched::Touched;

        const REGISTRY: DocId = DocId::from_bytes([23; 16]);
        let mut c = Cluster::new(&[OWNER, OWNER]);
        let now = c.now_ms;
        let out = c.nodes[0]
            .create_registry(REGISTRY, OWNER, EPOCH, now)
            .unwrap();
        let init: Vec<Vec<u8>> = out
            .iter()
            .filter_map(|o| match o {
                Output::PersistChunk { bytes, .. } => Some(bytes.clone()),
                _ => None,
            })
            .collect();
        assert!(!init.is_empty());
        for chunk in &init {
            assert_eq!(
                c.nodes[0]
                    .registry_entries_written(REGISTRY, chunk)
                    .unwrap(),
                Touched::Everything
            );
        }
        c.created(REGISTRY, DocKind::Registry, out);

        // Writes `f` on node 1, delivers it to node 0, and returns what node 0 reads the
        // incremental chunks it stored to have written.
        let step =
            |c: &mut Cluster, f: &dyn Fn(&mut automerge::AutoCommit, crate::hlc::Hlc)| -> Touched {
                let (_, out) = c.nodes[1]
                    .transact(REGISTRY, c.now_ms, None, |d, at, _| {
                        f(d, at);
                        Ok(())
                    })
                    .unwrap();
                let mut written = Touched::default();
                for o in out {
                    if let Output::Send { peer: 0, frame } = o {
                        for r in c.nodes[0].receive(1, frame, c.now_ms).unwrap() {
                            if let Output::PersistChunk {
                                kind: crate::ChunkKind::Incremental,
                                bytes,
                                ..
                            } = r
                            {
                                written.merge(
                                    c.nodes[0]
                                        .registry_entries_written(REGISTRY, &bytes)
                                        .unwrap(),
                                );
                            }
                        }
                    }
                }
                written
            };
        let named = |ids: &[&str]| Touched::Entries(ids.iter().map(|s| s.to_string()).collect());
        let doc_a = DocId::from_bytes([1; 16]);
        let doc_b = DocId::from_bytes([2; 16]);
        assert_eq!(
            step(&mut c, &|d, _| registry::put_entity(d, "light.a", doc_a)
                .unwrap()),
            named(&["light.a"])
        );
        assert_eq!(
            step(&mut c, &|d, _| registry::put_entity(d, "light.b", doc_b)
                .unwrap()),
            named(&["light.b"])
        );
        let share = Share {
            rights: crate::schema::registry::Rights::Read,
            policy: None,
            by: None,
        };
        assert_eq!(
            step(&mut c, &|d, _| registry::share(
                d, "light.b", "homeB", &share
            )
            .unwrap()),
            named(&["light.b"])
        );
        assert_eq!(
            step(&mut c, &|d, at| registry::tombstone(d, "light.a", at)
                .unwrap()),
            named(&["light.a"])
        );
    }
}
