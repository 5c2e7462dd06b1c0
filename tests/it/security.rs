//! What a paired home, a revoked device or a stale frame cannot do to the owner: each
//! test plays the attacker through real nodes on loopback (mDNS off).

use hearth::Node;
use tokio::time::timeout;

use crate::pairing::{T, wait_state, write};
use crate::sharing::{init_tracing, pair, start, until};

/// Waits until `node` holds no frames queued for `peer`: everything it sent is on the wire.
async fn drained(node: &Node, peer: &hearth::DeviceId) {
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
        .share("light.porch", b.home_id(), hearth::Rights::Read, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "off").await;
    let before = a.sync_counters().await.unwrap();

    // A's core stops reading; its network layer still takes frames off the wire.
    a.debug_stall_network_reads(true);
    let b_before = b.sync_counters().await.unwrap();
    b.debug_write_unchecked("light.porch", write("forged"))
        .await
        .unwrap();
    // B sends the push once its own flush is done; then it must have left B's queue.
    until("B sends the forged write", || async {
        b.sync_counters().await.unwrap().frames_sent > b_before.frames_sent
    })
    .await;
    drained(&b, a.peer_id()).await;
    let b_peer = b.peer_id().clone();
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

/// Joins a new device to `admin`'s home that keeps `peer` dialled (another home's device,
/// or another device of its own home), as mDNS would find it on a LAN.
async fn join_dialling(admin: &Node, dir: &std::path::Path, name: &str, peer: &Node) -> Node {
    let invite = timeout(T, admin.invite(std::time::Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    let config = crate::pairing::config(dir, name);
    timeout(T, Node::join(&invite.code, &config))
        .await
        .unwrap()
        .unwrap();
    start_dialling(dir, name, peer).await
}

/// Starts the node in `dir`, keeping `peer` dialled.
async fn start_dialling(dir: &std::path::Path, name: &str, peer: &Node) -> Node {
    let mut config = crate::pairing::config(dir, name);
    let addr = peer.listen_addrs().await.unwrap().remove(0);
    config.static_peers = vec![format!("{addr}/p2p/{}", peer.peer_id())];
    timeout(T, Node::start(config)).await.unwrap().unwrap()
}

/// Home A revokes one of its devices. Home B, which shares an entity with A and had
/// admitted that device, learns the signed revocation, shuts the device out, lists it,
/// and moves its entity to a key the device never gets. A lists what the device set up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revocation_reaches_a_paired_home() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.a", write("on")).await.unwrap();
    b.entities().set("sensor.b", write("v1")).await.unwrap();
    pair(&a, &b).await;
    b.shares()
        .share("sensor.b", a.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    wait_state(&a, "sensor.b", "v1").await;

    // A device of A that also reaches B directly: B admits it and grants it the entity.
    let a3 = join_dialling(&a, dirs[2].path(), "a3", &b).await;
    wait_state(&a3, "sensor.b", "v1").await;
    wait_state(&a3, "light.a", "on").await;
    // What a3 sets up with B, for A's admin to find later.
    a3.shares()
        .share("light.a", b.home_id(), hearth::Rights::Read, None)
        .await
        .unwrap();
    wait_state(&b, "light.a", "on").await;

    let a3_peer = a3.peer_id().clone();
    a.revoke_device(&a3_peer).await.unwrap();
    until("B lists the revoked device of A", || async {
        b.shares()
            .homes()
            .await
            .unwrap()
            .iter()
            .any(|h| h.home_id == a.home_id() && h.revoked_devices.contains(&a3_peer))
    })
    .await;
    let homes = a.shares().homes().await.unwrap();
    let with_b = homes.iter().find(|h| h.home_id == b.home_id()).unwrap();
    assert_eq!(
        with_b.made_by_revoked,
        vec![format!("share light.a by {a3_peer}")]
    );

    // B's next write reaches A's remaining device, under a key a3 cannot open.
    let captured = a.debug_capture().await.unwrap();
    b.entities().set("sensor.b", write("v2")).await.unwrap();
    wait_state(&a, "sensor.b", "v2").await;
    // Every frame sealed under a key made after the revocation: a3 opens none of them.
    let rotated: Vec<Vec<u8>> = captured
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.peer == b.peer_id().as_str() && c.stream == "sync")
        .filter(|c| epoch_of(&c.raw).is_some_and(|e| e > 0))
        .map(|c| c.raw.clone())
        .collect();
    assert!(!rotated.is_empty(), "no frame from B under a new key");
    for frame in rotated {
        assert!(a3.debug_open_frame(frame).await.is_err());
    }
    assert!(!b.admitted_peers().await.unwrap().contains(&a3_peer));
    assert_eq!(
        a3.entities().get("sensor.b").await.unwrap().unwrap().state,
        "v1"
    );

    // B keeps refusing it at hello: a3 keeps B dialled.
    let before = b.sync_counters().await.unwrap().hellos_refused;
    until("B refuses the revoked device at hello", || async {
        b.sync_counters().await.unwrap().hellos_refused > before
    })
    .await;
    assert!(!b.admitted_peers().await.unwrap().contains(&a3_peer));
    for node in [a, b, a3] {
        node.shutdown().await.unwrap();
    }
}

/// Inside a home: a device that learnt of a revocation refuses the revoked device at
/// hello even after the home document's record of it is reset and deleted (as a device
/// wanting it back would), and frames sealed under the key epoch before the rotation are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_holds_against_unsigned_resets_and_old_keys() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    a.entities()
        .set("light.hall", write("before"))
        .await
        .unwrap();
    let a2 = crate::pairing::join_and_start(&a, dirs[1].path(), "a2").await;
    let a3 = crate::pairing::join_and_start(&a, dirs[2].path(), "a3").await;
    wait_state(&a2, "light.hall", "before").await;
    wait_state(&a3, "light.hall", "before").await;

    // A frame a2 accepts today, sealed under the entity's first key.
    let captured = a2.debug_capture().await.unwrap();
    a.entities().set("light.hall", write("old")).await.unwrap();
    wait_state(&a2, "light.hall", "old").await;
    let old_frame = captured
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|c| c.peer == a.peer_id().as_str() && c.stream == "sync" && c.opened.is_some())
        .map(|c| c.raw.clone())
        .expect("a frame from A");

    let a3_peer = a3.peer_id().clone();
    a.revoke_device(&a3_peer).await.unwrap();
    a.entities()
        .set("light.hall", write("after"))
        .await
        .unwrap();
    wait_state(&a2, "light.hall", "after").await;

    // Replayed after the rotation, the old frame is refused.
    let before = a2.sync_counters().await.unwrap();
    a.debug_send_raw(a2.peer_id(), false, old_frame)
        .await
        .unwrap();
    until("a2 refuses a frame sealed under the old epoch", || async {
        a2.sync_counters().await.unwrap().frames_old_epoch > before.frames_old_epoch
    })
    .await;
    assert_eq!(
        a2.entities()
            .get("light.hall")
            .await
            .unwrap()
            .unwrap()
            .state,
        "after"
    );

    // a2's home document says a3 was never revoked; a3 comes to a2 directly.
    until("a2 knows the revocation", || async {
        a2.sync_counters().await.unwrap().hellos_refused > 0
            || !a2.admitted_peers().await.unwrap().contains(&a3_peer)
    })
    .await;
    a2.debug_clear_revocation(&a3_peer).await.unwrap();
    a3.shutdown().await.unwrap();
    let a3 = start_dialling(dirs[2].path(), "a3", &a2).await;
    let refused = a2.sync_counters().await.unwrap().hellos_refused;
    until("a2 refuses the revoked device at hello", || async {
        a2.sync_counters().await.unwrap().hellos_refused > refused
    })
    .await;
    assert!(!a2.admitted_peers().await.unwrap().contains(&a3_peer));
    for node in [a, a2, a3] {
        node.shutdown().await.unwrap();
    }
}

/// The key epoch counter a push or sync frame is sealed under.
fn epoch_of(raw: &[u8]) -> Option<u64> {
    match hearth_crdt::wire::decode(raw, hearth_net::MAX_FRAME_SIZE).ok()? {
        hearth_crdt::wire::Frame::Push(p) => Some(p.epoch.counter),
        hearth_crdt::wire::Frame::Sync(s) => Some(s.epoch.counter),
        _ => None,
    }
}

/// A home with write rights rewrites the shared entity's key epoch (to the counter's
/// maximum, where the owner's next rotation would overflow). The owner refuses the change
/// whole and audits it; the entity's value still syncs both ways afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_home_cannot_rewrite_an_entitys_header() {
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

    b.debug_write_epoch_unchecked("light.porch", u64::MAX)
        .await
        .unwrap();
    until("A refuses and audits B's header change", || async {
        a.shares()
            .audit(hearth::Timestamp::from_unix_ms(0))
            .await
            .unwrap()
            .iter()
            .any(|e| {
                e.action == "write.refused"
                    && e.actor == b.peer_id().as_str()
                    && e.subject.contains("header")
            })
    })
    .await;
    // A's own rotation still works: the counter was never moved at A.
    a.shares()
        .unshare("light.porch", b.home_id())
        .await
        .unwrap();
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    a.entities().set("light.porch", write("on")).await.unwrap();
    wait_state(&a, "light.porch", "on").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
