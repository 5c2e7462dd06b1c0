//! A hostile member: a device of a paired home with write rights on a shared entity,
//! holding real keys, sends the owner's device crafted Automerge changes sealed as real
//! sync frames (through the `test-hooks` seal and raw-send hooks). Each is refused and
//! audited, and the owner keeps serving: a later write still reaches the hostile device.
//! The compressed-chunk bomb, header and epoch rewrites and read-only writes have their
//! own tests (security_bomb.rs, security.rs, sharing.rs).

use std::io::Write;

use automerge::sync::{ChunkList, Message, MessageVersion};
use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjType, ROOT};
use hearth::Node;
use tokio::time::timeout;

use crate::pairing::{T, wait_state, write};
use crate::sharing::{init_tracing, pair, start, until};

/// Two homes, A owning `light.porch` and sharing it with B with write rights.
async fn setup() -> (Node, Node, Vec<tempfile::TempDir>) {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.porch", write("off")).await.unwrap();
    pair(&a, &b).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "off").await;
    (a, b, dirs)
}

/// The Automerge actor a node writes with.
fn actor_of(node: &Node) -> ActorId {
    let peer: hearth_net::PeerId = node.peer_id().as_str().parse().unwrap();
    hearth_crdt::actor_for_peer(&peer.to_bytes())
}

/// The changes a fresh document by `actor` gets from `f`, as raw change chunks.
fn changes_by(actor: ActorId, f: impl FnOnce(&mut AutoCommit)) -> Vec<Vec<u8>> {
    let mut doc = AutoCommit::new().with_actor(actor);
    f(&mut doc);
    doc.get_changes(&[])
        .into_iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

/// A sync message carrying `changes`.
fn message(changes: Vec<Vec<u8>>) -> Vec<u8> {
    Message {
        heads: Vec::new(),
        need: Vec::new(),
        have: Vec::new(),
        changes: ChunkList::from(changes),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode()
}

/// Seals `payload` as B's sync frame for `light.porch` and sends it to A.
async fn send(a: &Node, b: &Node, payload: Vec<u8>) {
    let frame = timeout(T, b.debug_seal_sync("light.porch", payload))
        .await
        .unwrap()
        .unwrap();
    timeout(T, b.debug_send_raw(a.peer_id(), false, frame))
        .await
        .unwrap()
        .unwrap();
}

/// Waits until A has audited a refused frame from B whose reason contains `why`.
async fn refused_and_audited(a: &Node, b: &Node, why: &str) {
    until(&format!("A audits B's frame as refused: {why}"), || async {
        a.shares()
            .audit(hearth::Timestamp::from_unix_ms(0))
            .await
            .unwrap()
            .iter()
            .any(|e| {
                e.action.ends_with(".refused")
                    && e.actor == b.peer_id().as_str()
                    && e.subject.contains(why)
            })
    })
    .await;
}

/// A keeps serving B: its next write reaches B, and B's next write reaches A.
async fn still_serving(a: &Node, b: &Node, tag: &str) {
    let mine = format!("a-after-{tag}");
    a.entities().set("light.porch", write(&mine)).await.unwrap();
    wait_state(b, "light.porch", &mine).await;
    let theirs = format!("b-after-{tag}");
    b.entities()
        .set("light.porch", write(&theirs))
        .await
        .unwrap();
    wait_state(a, "light.porch", &theirs).await;
}

/// Changes by an actor that is no device of either home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paired_device_sending_changes_under_a_forged_actor_is_refused() {
    let (a, b, _dirs) = setup().await;
    let forged = ActorId::from(&[0x42u8; 16][..]);
    let changes = changes_by(forged, |d| {
        d.put(ROOT, "state", "forged").unwrap();
    });
    let refused = a.sync_counters().await.unwrap().frames_refused;
    send(&a, &b, message(changes)).await;
    refused_and_audited(&a, &b, "not a device of its home").await;
    assert!(a.sync_counters().await.unwrap().frames_refused > refused);
    assert_ne!(
        a.entities()
            .get("light.porch")
            .await
            .unwrap()
            .unwrap()
            .state,
        "forged"
    );
    still_serving(&a, &b, "forged").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A flood of changes whose dependencies A never saw: each is the second change of a
/// document A does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_changes_with_missing_dependencies_leaves_the_owner_serving() {
    let (a, b, _dirs) = setup().await;
    let actor = actor_of(&b);
    for batch in 0..20 {
        let mut orphans = Vec::new();
        for k in 0..100 {
            let mut changes = changes_by(actor.clone(), |d| {
                d.put(ROOT, "n", 0i64).unwrap();
                d.commit();
                d.put(ROOT, "n", (batch * 100 + k) as i64).unwrap();
                d.commit();
            });
            orphans.push(changes.pop().unwrap());
        }
        send(&a, &b, message(orphans)).await;
    }
    still_serving(&a, &b, "orphans").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Maps nested 10,000 deep (about 100 KB), written under B's own actor: refused by the
/// nesting cap in one pass, before anything walks the objects (walking them once held the
/// owner's core for over 30 s), and A keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesting_ten_thousand_deep_from_a_paired_device_is_refused() {
    let (a, b, _dirs) = setup().await;
    let changes = changes_by(actor_of(&b), |d| {
        let mut obj = d.put_object(ROOT, "attributes", ObjType::Map).unwrap();
        for _ in 0..10_000 {
            obj = d.put_object(&obj, "x", ObjType::Map).unwrap();
        }
    });
    send(&a, &b, message(changes)).await;
    refused_and_audited(&a, &b, "nested deeper than 32 levels").await;
    still_serving(&a, &b, "nesting").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A change chunk holding a 100 MB text, deflated (chunk type 2) so that it fits in a
/// frame at all: uncompressed it is 25 times the 4 MiB frame cap and never leaves the
/// sender. The owner refuses compressed chunks without inflating them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_text_from_a_paired_device_is_refused() {
    let (a, b, _dirs) = setup().await;
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    let line = "y".repeat(1 << 20);
    for _ in 0..100 {
        deflate.write_all(line.as_bytes()).unwrap();
    }
    let body = deflate.finish().unwrap();
    // Magic bytes, a checksum (never reached), chunk type 2, ULEB128 length, body.
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    let mut len = body.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            chunk.push(byte);
            break;
        }
        chunk.push(byte | 0x80);
    }
    chunk.extend(body);
    send(&a, &b, message(vec![chunk])).await;
    refused_and_audited(&a, &b, "compressed chunk").await;
    still_serving(&a, &b, "large").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
