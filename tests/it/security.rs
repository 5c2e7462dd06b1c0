//! What a paired home, a revoked device or a stale frame cannot do to the owner: each
//! test plays the attacker through real nodes on loopback (mDNS off).

use hearth::Node;
use tokio::time::timeout;

use crate::pairing::{T, wait_state, write};
use crate::sharing::{init_tracing, pair, start, until};

/// Waits until `node` holds no frames queued for `peer`: everything it sent is on the wire.
async fn drained(node: &Node, peer: &str) {
    until("the sender's queue drains", || async {
        matches!(node.outbound_queue(peer).await, Ok(None) | Ok(Some((0, _))))
    })
    .await;
}

/// A read-only home's device writes, and its connection ends before the owner reads the
/// frame (lifecycle events overtake queued frames). The owner must judge the frame by
/// what its sender was when it arrived, a device of a read-only home, not treat a peer it
/// no longer knows as one of its own devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_read_after_its_sender_left_is_not_applied() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.porch", write("off")).await.unwrap();
    pair(&a, &b).await;
    a.shares()
        .share("light.porch", b.home_id(), true, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "off").await;
    let before = a.sync_counters().await.unwrap();

    // A's core stops reading; its network layer still takes frames off the wire.
    a.debug_stall_network_reads(true);
    b.debug_write_unchecked("light.porch", write("forged"))
        .await
        .unwrap();
    drained(&b, a.peer_id()).await;
    let b_peer = b.peer_id().to_string();
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    until("A's network sees B gone", || async {
        matches!(a.outbound_queue(&b_peer).await, Ok(None))
    })
    .await;
    a.debug_stall_network_reads(false);

    // The disconnect is read first, then the frame: it is dropped and counted.
    until("A drops the frame of a peer no longer admitted", || async {
        a.sync_counters().await.unwrap().frames_unadmitted > before.frames_unadmitted
    })
    .await;
    let seen = a.entities().get("light.porch").await.unwrap().unwrap();
    assert_eq!(seen.state, "off");
    let history = a.entities().history("light.porch", 100).await.unwrap();
    assert!(history.iter().all(|v| v.device != b_peer), "{history:?}");
    a.shutdown().await.unwrap();
}
