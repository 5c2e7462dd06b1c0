//! A device of a home an entity is shared with, read-only, sends the owner's device a
//! sync message for it carrying a compressed-chunk bomb, sealed under the entity key as
//! a real frame would be. The owner refuses it without inflating it, and keeps serving.

use std::io::Write;
use std::time::{Duration, Instant};

use automerge::sync::{ChunkList, Message, MessageVersion};
use hearth::Node;
use tokio::time::timeout;

use crate::pairing::{T, config, wait_state, write};

/// What the bomb inflates to: far more than the frame that carries it (a few KiB), and
/// enough that inflating it would show; the refusal must not depend on the size.
const BOMB_INFLATED: usize = 32 << 20;

async fn start(dir: &std::path::Path, name: &str) -> Node {
    timeout(T, Node::start(config(dir, name)))
        .await
        .unwrap()
        .unwrap()
}

/// Pairs `joiner`'s home with `issuer`'s through a home code.
async fn pair(issuer: &Node, joiner: &Node) {
    let code = timeout(T, issuer.invite_home(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    timeout(T, joiner.shares().pair(&code.code))
        .await
        .unwrap()
        .unwrap();
}

/// Polls until `f` holds, or fails naming `what`.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A compressed change chunk (type 2) whose deflate stream inflates to
/// [`BOMB_INFLATED`] zero bytes, in a sync message.
fn bomb_message() -> Vec<u8> {
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 16];
    for _ in 0..BOMB_INFLATED / zeros.len() {
        deflate.write_all(&zeros).unwrap();
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
    Message {
        heads: Vec::new(),
        need: Vec::new(),
        have: Vec::new(),
        changes: ChunkList::from(vec![chunk]),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_bomb_from_a_read_only_home_is_refused_and_the_owner_keeps_serving() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.porch", write("off")).await.unwrap();
    pair(&a, &b).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Read, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "off").await;

    let payload = bomb_message();
    assert!(payload.len() < 64 * 1024, "{} bytes", payload.len());
    let frame = timeout(T, b.debug_seal_sync("light.porch", payload))
        .await
        .unwrap()
        .unwrap();
    let refused_before = a.sync_counters().await.unwrap().frames_refused;
    timeout(T, b.debug_send_raw(a.peer_id(), false, frame))
        .await
        .unwrap()
        .unwrap();

    // A opened the frame (it is sealed under the real key) and refused what it carries,
    // saying why.
    until("A refuses B's frame", || async {
        a.sync_counters().await.unwrap().frames_refused > refused_before
    })
    .await;
    until("A audits the refusal as a compressed chunk", || async {
        a.shares()
            .audit(hearth::Timestamp::from_unix_ms(0))
            .await
            .unwrap()
            .iter()
            .any(|e| {
                e.action == "sync.refused"
                    && e.actor == b.peer_id().as_str()
                    && e.subject.contains("compressed chunk")
            })
    })
    .await;

    // A keeps serving: it answers reads, and a write made after the bomb reaches B.
    a.entities()
        .set("light.porch", write("sentinel"))
        .await
        .unwrap();
    assert_eq!(
        a.entities()
            .get("light.porch")
            .await
            .unwrap()
            .unwrap()
            .state,
        "sentinel"
    );
    wait_state(&b, "light.porch", "sentinel").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
