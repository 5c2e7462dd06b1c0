//! Generations on the seeded multi-peer harness: cuts by one device, moves,
//! carries of concurrent writes, partitions and restarts.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::engine::EngineConfig;
use crate::engine::generation::Generation;
use crate::harness::Net;
use crate::hlc::Hlc;
use crate::ids::{DocId, KeyEpoch};
use crate::schema::entity::EntityUpdate;

const FIRST: DocId = DocId::from_bytes([1; 16]);

fn state(s: &str) -> EntityUpdate {
    EntityUpdate {
        state: s.into(),
        attributes: None,
    }
}

/// The generations of the entity, oldest first, and which node holds which.
struct Gens {
    docs: Vec<DocId>,
}

impl Gens {
    fn current(&self) -> DocId {
        *self.docs.last().unwrap()
    }

    /// The newest generation node `n` holds with content.
    fn current_on(&self, net: &mut Net, n: usize) -> DocId {
        *self
            .docs
            .iter()
            .rev()
            .find(|d| net.nodes[n].heads(**d).is_ok_and(|h| !h.is_empty()))
            .unwrap()
    }
}

/// Node 0 (the cutting device) cuts the current generation.
fn cut(net: &mut Net, gens: &mut Gens) {
    let old = gens.current();
    let new = DocId::from_bytes([gens.docs.len() as u8 + 1; 16]);
    let out = net.nodes[0]
        .cut_generation(old, new, KeyEpoch::first([0; 16]), net.now_ms)
        .unwrap();
    net.absorb(0, out);
    net.spread(0, new);
    gens.docs.push(new);
}

/// Every node moves through every generation it holds, oldest first, until no move
/// writes anything more (a carry into a middle generation is carried on by the next
/// move). Returns whether anything was written.
fn move_all(net: &mut Net, gens: &Gens) -> bool {
    let mut wrote = false;
    for n in 0..net.nodes.len() {
        for doc in gens.docs.iter().skip(1) {
            if net.nodes[n].heads(*doc).map_or(true, |h| h.is_empty()) {
                continue;
            }
            let report = net.nodes[n].move_to_generation(*doc, net.now_ms).unwrap();
            if !report.outputs.is_empty() {
                wrote = true;
            }
            net.absorb(n, report.outputs);
        }
    }
    wrote
}

/// Runs the network and the moves until both are quiet.
fn settle(net: &mut Net, gens: &Gens) {
    for _ in 0..20 {
        net.run_until_quiet(500_000);
        if !move_all(net, gens) {
            net.run_until_quiet(500_000);
            return;
        }
    }
    panic!("moves never settled");
}

/// Each node's view of the entity in its current generation.
fn views(net: &mut Net, gens: &Gens) -> Vec<crate::schema::entity::Entity> {
    (0..net.nodes.len())
        .map(|n| {
            let doc = gens.current_on(net, n);
            net.nodes[n].resolved_entity(doc).unwrap().entity
        })
        .collect()
}

/// Writes `s` on node `n` to the generation it is on, and returns the write's clock.
fn write(net: &mut Net, gens: &Gens, n: usize, s: &str) -> Hlc {
    let doc = gens.current_on(net, n);
    net.edit(n, doc, &state(s), None);
    net.nodes[n].entity(doc).unwrap().updated_at
}

#[test]
fn a_cut_moves_every_device_and_carries_a_concurrent_write() {
    let mut net = Net::new(3, 7, EngineConfig::default());
    net.share_entity(FIRST);
    let mut gens = Gens { docs: vec![FIRST] };
    settle(&mut net, &gens);
    write(&mut net, &gens, 1, "warm");
    settle(&mut net, &gens);
    // Node 2 is cut off and writes on the old generation while node 0 cuts.
    net.isolated[2] = true;
    net.advance(10);
    let late = write(&mut net, &gens, 2, "from-the-partition");
    cut(&mut net, &mut gens);
    for _ in 0..200 {
        net.step();
    }
    move_all(&mut net, &gens);
    let before = views(&mut net, &gens);
    assert_eq!(before[0].state, "warm", "the cut holds the state as shown");
    net.isolated[2] = false;
    settle(&mut net, &gens);
    let after = views(&mut net, &gens);
    assert!(after.iter().all(|v| v == &after[0]), "{after:?}");
    assert_eq!(after[0].state, "from-the-partition");
    assert_eq!(after[0].updated_at, late);
    // Every device has moved, and the new generation names the old one.
    let g = net.nodes[1].generation(gens.current()).unwrap().unwrap();
    assert_eq!(g.prev, FIRST);
    assert_eq!(g.moved.len(), 3);
    assert_eq!(g.cut_by, *net.nodes[0].actor());
}

#[test]
fn an_older_concurrent_write_loses_to_the_cut_value_as_it_would_have() {
    let mut net = Net::new(3, 8, EngineConfig::default());
    net.share_entity(FIRST);
    let mut gens = Gens { docs: vec![FIRST] };
    settle(&mut net, &gens);
    net.isolated[2] = true;
    // Node 2 writes first; node 1 writes later (a newer clock) and the cut copies it.
    write(&mut net, &gens, 2, "older");
    net.advance(50);
    for _ in 0..50 {
        net.step();
    }
    write(&mut net, &gens, 1, "newer");
    for _ in 0..200 {
        net.step();
    }
    cut(&mut net, &mut gens);
    net.isolated[2] = false;
    settle(&mut net, &gens);
    let v = views(&mut net, &gens);
    assert!(v.iter().all(|x| x == &v[0]));
    assert_eq!(v[0].state, "newer");
}

#[test]
fn a_pending_user_choice_keeps_its_candidates_across_a_cut() {
    let mut net = Net::new(3, 11, EngineConfig::default());
    net.share_entity(FIRST);
    let mut gens = Gens { docs: vec![FIRST] };
    settle(&mut net, &gens);
    let out = net.nodes[0]
        .set_entity_policy(FIRST, crate::policy::Policy::UserChoice, net.now_ms, None)
        .unwrap();
    net.absorb(0, out);
    settle(&mut net, &gens);
    // Two devices write at once: a conflict that waits for a person.
    net.advance(5);
    write(&mut net, &gens, 1, "left");
    write(&mut net, &gens, 2, "right");
    settle(&mut net, &gens);
    let before = net.nodes[0].resolved_entity(FIRST).unwrap();
    assert_eq!(before.pending().count(), 1);
    cut(&mut net, &mut gens);
    settle(&mut net, &gens);
    let values = |r: &crate::policy::ResolvedEntity| {
        let mut v: Vec<String> = r
            .pending()
            .flat_map(|c| c.candidates.iter().map(|x| x.value.to_string()))
            .collect();
        v.sort();
        v
    };
    for n in 0..3 {
        let after = net.nodes[n].resolved_entity(gens.current()).unwrap();
        assert_eq!(after.policy, crate::policy::Policy::UserChoice);
        assert_eq!(values(&after), values(&before), "node {n}");
        assert_eq!(after.entity.state, before.entity.state, "node {n}");
    }
}

#[test]
fn a_record_written_by_two_devices_is_refused() {
    let mut net = Net::new(2, 9, EngineConfig::default());
    net.share_entity(FIRST);
    let mut gens = Gens { docs: vec![FIRST] };
    settle(&mut net, &gens);
    cut(&mut net, &mut gens);
    settle(&mut net, &gens);
    let new = gens.current();
    assert!(net.nodes[1].generation(new).unwrap().is_some());
    // Node 1 rewrites the cut's heads: the record no longer has one writer.
    let (_, out) = net.nodes[1]
        .transact(new, net.now_ms, None, |d, _, _| {
            use automerge::transaction::Transactable;
            use automerge::{ROOT, ReadDoc};
            let (_, g) = d.get(ROOT, "generation").unwrap().unwrap();
            d.put(&g, "prev_heads", "").unwrap();
            Ok(())
        })
        .unwrap();
    net.absorb(1, out);
    net.run_until_quiet(100_000);
    for n in 0..2 {
        assert!(net.nodes[n].generation(new).is_err(), "node {n}");
    }
}

#[test]
fn hostile_records_fail_closed() {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT};
    let record = |f: &dyn Fn(&mut AutoCommit, &automerge::ObjId)| {
        let mut d = AutoCommit::new();
        let g = d.put_object(ROOT, "generation", ObjType::Map).unwrap();
        d.put(&g, "number", 1u64).unwrap();
        d.put(&g, "prev", FIRST.to_string()).unwrap();
        d.put(&g, "prev_heads", "").unwrap();
        d.put_object(&g, "prev_clock", ObjType::Map).unwrap();
        d.put_object(&g, "field_clocks", ObjType::Map).unwrap();
        d.put(&g, "cut_at", 5u64).unwrap();
        f(&mut d, &g);
        Generation::read(&d)
    };
    assert!(record(&|_, _| {}).unwrap().is_some());
    assert!(
        record(&|d, g| {
            d.put(g, "number", 0u64).unwrap();
        })
        .is_err()
    );
    assert!(
        record(&|d, g| {
            d.put(g, "prev", "not a doc").unwrap();
        })
        .is_err()
    );
    assert!(
        record(&|d, g| {
            d.put(g, "prev_heads", "zz").unwrap();
        })
        .is_err()
    );
    assert!(
        record(&|d, g| {
            d.put(g, "prev_heads", "ab".repeat(32 * 65)).unwrap();
        })
        .is_err()
    );
    assert!(
        record(&|d, g| {
            let c = d.put_object(g, "prev_clock", ObjType::Map).unwrap();
            for i in 0..=super::engine::generation::MAX_CLOCK_ACTORS {
                d.put(&c, format!("{i:032x}"), 1u64).unwrap();
            }
        })
        .is_err()
    );
    assert!(
        record(&|d, g| {
            d.put(g, "cut_at", "soon").unwrap();
        })
        .is_err()
    );
}

/// One step of the generations property.
#[derive(Clone, Debug)]
enum Op {
    Write(usize),
    Cut,
    Isolate(usize),
    Heal,
    Restart(usize),
    Deliver(u8),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0usize..3).prop_map(Op::Write),
        1 => Just(Op::Cut),
        1 => (1usize..3).prop_map(Op::Isolate),
        1 => Just(Op::Heal),
        1 => (0usize..3).prop_map(Op::Restart),
        3 => (1u8..40).prop_map(Op::Deliver),
        1 => (1u16..2000).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random writes on 3 devices, with cuts by device 0, partitions and restarts.
    /// Once the network heals and every device has moved, every device shows the same
    /// entity, and that is the write with the newest clock: no acknowledged write is
    /// lost to a cut.
    #[test]
    fn writes_survive_cuts_partitions_and_restarts(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..50)) {
        let mut net = Net::new(3, seed, EngineConfig::default());
        net.share_entity(FIRST);
        let mut gens = Gens { docs: vec![FIRST] };
        settle(&mut net, &gens);
        let mut newest: Option<(Hlc, String)> = None;
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Write(n) => {
                    let s = format!("w{i}-{n}");
                    let at = write(&mut net, &gens, n, &s);
                    if newest.as_ref().is_none_or(|(t, _)| at > *t) {
                        newest = Some((at, s));
                    }
                }
                Op::Cut => {
                    // Device 0 cuts only the generation it is on.
                    if gens.current_on(&mut net, 0) == gens.current() {
                        cut(&mut net, &mut gens);
                    }
                }
                Op::Isolate(n) => net.isolated[n] = true,
                Op::Heal => net.isolated = vec![false; 3],
                Op::Restart(n) => {
                    // A restart takes time: the restarted clock starts past every
                    // clock the node stamped before.
                    net.advance(1000);
                    net.restart(n);
                }
                Op::Deliver(k) => {
                    for _ in 0..k {
                        net.step();
                    }
                    move_all(&mut net, &gens);
                }
                Op::Advance(ms) => net.advance(u64::from(ms)),
            }
        }
        net.isolated = vec![false; 3];
        settle(&mut net, &gens);
        let v = views(&mut net, &gens);
        prop_assert!(v.iter().all(|x| x == &v[0]), "views differ: {:?}", v);
        for n in 0..3 {
            prop_assert_eq!(gens.current_on(&mut net, n), gens.current());
        }
        if let Some((at, s)) = newest {
            prop_assert_eq!(&v[0].state, &s);
            prop_assert_eq!(v[0].updated_at, at);
        }
        let moved: BTreeMap<usize, usize> = gens.docs.iter().skip(1).enumerate()
            .map(|(i, d)| (i, net.nodes[0].generation(*d).unwrap().unwrap().moved.len()))
            .collect();
        prop_assert!(moved.values().all(|m| *m == 3), "moved: {:?}", moved);
    }
}
