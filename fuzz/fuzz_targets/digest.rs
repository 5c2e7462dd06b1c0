//! Fuzzes the digest message decoder and the reconciler that reads what it decodes: any
//! input must decode to a message or an error value, a message that decodes must survive a
//! round trip, and a reconciler fed a sequence of decoded messages (as a peer would send
//! them, starting its own session or answering one) must answer or fail its session
//! without panicking.
#![no_main]

use std::sync::LazyLock;

use hearth_crdt::DocId;
use hearth_crdt::digest::{DigestMessage, DigestTree, Reconciler};
use libfuzzer_sys::fuzz_target;

/// A tree of a few hundred documents, so that the reconciler descends past the root.
fn tree() -> DigestTree {
    let mut tree = DigestTree::new();
    for i in 0..300u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&i.to_le_bytes());
        tree.insert(DocId::from_bytes(id), hash);
    }
    tree
}

/// Built once: the tree is the same for every input.
static TREE: LazyLock<DigestTree> = LazyLock::new(tree);

fuzz_target!(|data: &[u8]| {
    // Inputs are split on the byte 0xff into successive messages of one peer.
    let tree = &*TREE;
    let mut answering = Reconciler::new();
    let mut starting = Reconciler::new();
    let started = starting.start(1, tree).is_ok();
    for part in data.split(|b| *b == 0xff).filter(|p| !p.is_empty()) {
        let Ok(message) = DigestMessage::decode(part) else {
            continue;
        };
        let again = DigestMessage::decode(&message.encode()).expect("a re-encoded message decodes");
        assert_eq!(again, message);
        let _ = answering.handle(tree, message.clone());
        if started {
            let _ = starting.handle(tree, message);
        }
    }
});
