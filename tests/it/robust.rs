//! A's neighbours misbehave: a device that stops reading, and peers that send garbage on
//! every protocol. A drops them, its queues stay within their caps, and it keeps syncing
//! with B throughout.

use std::time::{Duration, Instant};

use hearth::{Node, PEER_QUEUE_BYTES, PEER_QUEUE_FRAMES};
use tokio::time::timeout;

use crate::pairing::{T, config, join_and_start, wait_state, write};

const WRITERS: usize = 4;
/// Entities each writer writes in one `set_many` call: one push frame each, since pushes
/// to one peer merge only per document.
const PER_CALL: usize = 50;
const MAX_WRITES: usize = 40_000;

/// Proves A still reaches B: a fresh value written on A shows up on B. A is kept as busy
/// as its writers can make it, and its pushes leave after the store batches queued before
/// them, so on a machine whose disk is shared with other work this may take longer than
/// the usual wait; it is a liveness check, not a latency one.
async fn still_syncing(a: &Node, b: &Node, tag: &str) {
    still_syncing_within(a, b, tag, 2 * T).await;
}

/// [`still_syncing`] with its own wait, during which B must keep receiving: no more than
/// [`QUIET`] may pass without a frame arriving on B.
async fn still_syncing_within(a: &Node, b: &Node, tag: &str, wait: Duration) {
    timeout(2 * T, a.entities().set("light.tick", write(tag)))
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + wait;
    let mut received = b.sync_counters().await.unwrap().frames_received;
    let mut moved = Instant::now();
    loop {
        if let Ok(Some(e)) = b.entities().get("light.tick").await
            && e.state == tag
        {
            return;
        }
        let now = b.sync_counters().await.unwrap().frames_received;
        if now != received {
            received = now;
            moved = Instant::now();
        }
        assert!(
            moved.elapsed() < QUIET,
            "B received nothing for {QUIET:?} while waiting for light.tick = {tag:?}"
        );
        assert!(
            Instant::now() < deadline,
            "light.tick never reached {tag:?} on B"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many peers `node` dropped for letting their outbound queue fill, from its metrics.
async fn slow_peers_dropped(node: &Node) -> u64 {
    let text = node.metrics().await.unwrap();
    text.lines()
        .find(|l| !l.starts_with('#') && l.contains("kind=\"slow_peer_dropped\""))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Longest B may go without receiving a frame while A is flooded.
const QUIET: Duration = Duration::from_secs(20);

/// How long a write on A may take to reach B while A is flooded. In a debug build on a
/// loaded two-core machine B applies well under a hundred frames a second, while each
/// write A makes costs it a push, a confirmation round and its reply: the frames A
/// queues toward B are then tens of seconds deep, and the check is that they keep
/// moving (see [`QUIET`]), not how fast.
const FLOOD_WAIT: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_is_dropped_while_a_keeps_syncing_with_b() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;

    let c = join_and_start(&a, dirs[2].path(), "c").await;
    let c_peer = c.peer_id().clone();
    let deadline = Instant::now() + T;
    while !a.admitted_peers().await.unwrap().contains(&c_peer) {
        assert!(Instant::now() < deadline, "C was never admitted by A");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_syncing(&a, &b, "before").await;

    // C's sync processing hangs: its connection stays up and answers pings, but nothing
    // reads what A sends it.
    c.debug_stall_network_reads(true);
    // Writers keep A busy; a watcher samples A's queue toward C until C is gone. They
    // write as fast as B follows: each waits until B holds its call before last before
    // the next. Writers B could not keep up with would make B's own backlog the test (with C
    // stalled, A has the CPU C no longer takes, and in a debug build it outruns B, whose
    // frames then wait in A's queue and B's 8 MiB inbound buffer).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let entities = a.entities();
        let on_b = b.entities();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < MAX_WRITES / WRITERS {
                if n >= 2 * PER_CALL {
                    let first = format!("sensor.blob_{}", w * PER_CALL);
                    let previous = n - 2 * PER_CALL;
                    let deadline = Instant::now() + FLOOD_WAIT;
                    // At or past it: B may apply several of a writer's calls at once.
                    while on_b
                        .get(&first)
                        .await
                        .unwrap()
                        .is_none_or(|e| e.state.parse::<usize>().unwrap_or(0) < previous)
                    {
                        assert!(
                            Instant::now() < deadline,
                            "B never got {first} at {previous} or later"
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                let calls: Vec<(hearth::EntityId, hearth::EntityWrite)> = (0..PER_CALL)
                    .map(|k| {
                        let id = format!("sensor.blob_{}", w * PER_CALL + k);
                        let mut blob = write(&format!("{n}"));
                        let text = hex::encode(noise((n + k) as u64, 1024));
                        blob.attributes = Some(
                            [("blob".to_string(), serde_json::Value::String(text))]
                                .into_iter()
                                .collect(),
                        );
                        (id.into(), blob)
                    })
                    .collect();
                timeout(T, entities.set_many(calls)).await.unwrap().unwrap();
                n += PER_CALL;
            }
            n
        }));
    }
    let (mut max_frames, mut max_bytes) = (0, 0);
    let mut dropped = false;
    // Times C went away for another reason than its queue: on a machine loaded by other
    // work a ping may time out first. C's network still answers, so it comes back and
    // its queue fills again; only the queue cap's own drop (its metric) ends the wait.
    let mut other_losses = 0;
    let mut connected = true;
    let mut checks = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline && !writers.iter().all(|w| w.is_finished()) {
        match a.outbound_queue(&c_peer).await.unwrap() {
            Some((frames, bytes)) => {
                max_frames = max_frames.max(frames);
                max_bytes = max_bytes.max(bytes);
                connected = true;
            }
            None => {
                if slow_peers_dropped(&a).await > 0 {
                    dropped = true;
                    break;
                }
                if connected {
                    other_losses += 1;
                    connected = false;
                }
            }
        }
        checks += 1;
        if checks % 50 == 0 {
            still_syncing_within(&a, &b, &format!("during-{checks}"), FLOOD_WAIT).await;
            // C may have been dropped and let back in while B was being checked.
            if slow_peers_dropped(&a).await > 0 {
                dropped = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    assert!(
        dropped,
        "A never dropped the stalled device after {writes} writes; its queue peaked at \
         {max_frames} frames / {max_bytes} bytes ({other_losses} losses of C for another reason)"
    );
    assert!(
        max_frames <= PEER_QUEUE_FRAMES && max_bytes <= PEER_QUEUE_BYTES,
        "queue to C reached {max_frames} frames / {max_bytes} bytes"
    );
    // The queue, not a ping timeout, is what gave up on C: it had filled most of the way.
    assert!(
        max_bytes >= PEER_QUEUE_BYTES / 2 || max_frames >= PEER_QUEUE_FRAMES / 2,
        "C was dropped after {writes} writes with only {max_frames} frames / {max_bytes} bytes queued"
    );
    still_syncing_within(&a, &b, "after", FLOOD_WAIT).await;
    // B holds every write A made meanwhile.
    for id in 0..WRITERS * PER_CALL {
        let id = format!("sensor.blob_{id}");
        let on_a = a.entities().get(&id).await.unwrap();
        let deadline = Instant::now() + T;
        loop {
            let on_b = b.entities().get(&id).await.unwrap();
            if on_b == on_a {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id} differs on B: {on_b:?} vs {on_a:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Once C reads again it reconnects and catches up by digest: every write A made
    // meanwhile, tens of megabytes in a debug build beside the other tests.
    c.debug_stall_network_reads(false);
    let deadline = Instant::now() + 3 * T;
    for id in 0..WRITERS * PER_CALL {
        let id = format!("sensor.blob_{id}");
        let on_a = a.entities().get(&id).await.unwrap();
        while c.entities().get(&id).await.unwrap() != on_a {
            assert!(Instant::now() < deadline, "{id} never caught up on C");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    timeout(T, c.shutdown()).await.unwrap().unwrap();
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

/// Deterministic noise, different for each `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Frames a member device could send that no Hearth node would: noise, truncated and
/// mistyped envelopes, and well-formed frames whose contents are wrong.
fn bad_frames() -> Vec<(&'static str, Vec<u8>)> {
    use hearth_crdt::ids::{DocId, KeyEpoch};
    use hearth_crdt::wire::{self, DigestFrame, Frame, Push, SyncMessage};
    let doc = DocId::from_bytes([0x42; hearth_crdt::ids::DOC_ID_LEN]);
    let epoch = KeyEpoch::first([7; 16]);
    let push = wire::encode(&Frame::Push(Push {
        doc,
        epoch,
        correlation_id: None,
        bytes: noise(1, 300),
    }));
    vec![
        ("empty", Vec::new()),
        ("noise", noise(2, 4096)),
        ("truncated push", push[..push.len() / 2].to_vec()),
        ("push with an unsealed payload", push.clone()),
        (
            "sync message for an unknown document",
            wire::encode(&Frame::Sync(SyncMessage {
                doc,
                epoch,
                expects_reply: true,
                bytes: noise(3, 512),
            })),
        ),
        (
            "digest full of noise",
            wire::encode(&Frame::Digest(DigestFrame {
                bytes: noise(4, 16 * 1024),
            })),
        ),
        ("cbor of another shape", vec![0xa1, 0x61, 0x78, 0x18, 0x2a]),
    ]
}

/// A bare libp2p peer with no certificate: it connects, opens `protocol` and writes
/// `payload`, then waits until the node closes the stream or the connection.
async fn raw_attack(
    target: libp2p::Multiaddr,
    target_peer: libp2p::PeerId,
    protocol: libp2p::StreamProtocol,
    payload: Vec<u8>,
) {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    let mut control = swarm.behaviour().new_control();
    swarm.dial(target).unwrap();
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    // The node may refuse the protocol outright (streams need admission); that is a
    // fine outcome too. When it accepts, it must hang up on what follows.
    if let Ok(Ok(mut stream)) = timeout(T, control.open_stream(target_peer, protocol)).await {
        let _ = stream.write_all(&payload).await;
        let _ = stream.flush().await;
        let _ = stream.close().await;
        let mut sink = Vec::new();
        let _ = timeout(T, stream.read_to_end(&mut sink)).await;
    }
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_protocol_leaves_a_healthy_and_syncing_with_b() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    let c = join_and_start(&a, dirs[2].path(), "c").await;
    let deadline = Instant::now() + T;
    while !a.admitted_peers().await.unwrap().contains(c.peer_id()) {
        assert!(Instant::now() < deadline, "C was never admitted by A");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_syncing(&a, &b, "before").await;

    // A member device sends garbage on the sync and ephemeral streams.
    for (round, (what, bytes)) in bad_frames().into_iter().enumerate() {
        for ephemeral in [false, true] {
            // A dropped connection is a fine answer; C's node redials and is admitted again.
            let deadline = Instant::now() + T;
            while c
                .debug_send_raw(a.peer_id(), ephemeral, bytes.clone())
                .await
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "C could not reach A to send {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            still_syncing(&a, &b, &format!("member-{round}-{ephemeral}")).await;
        }
    }

    // A stranger without a certificate sends noise and oversized messages on each
    // protocol, as far as the node lets it.
    let addr: libp2p::Multiaddr = a.listen_addrs().await.unwrap().remove(0).parse().unwrap();
    let a_peer: libp2p::PeerId = a.peer_id().parse().unwrap();
    for protocol in [
        hearth_net::HELLO_PROTOCOL,
        hearth_net::PAIR_PROTOCOL,
        hearth_net::SYNC_PROTOCOL,
        hearth_net::EPHEMERAL_PROTOCOL,
    ] {
        for (i, payload) in [
            noise(10, 4096),
            // A length prefix far above any cap, then more bytes than any cap allows.
            [vec![0xff; 8], noise(11, hearth_net::MAX_FRAME_SIZE + 4096)].concat(),
        ]
        .into_iter()
        .enumerate()
        {
            raw_attack(addr.clone(), a_peer, protocol.clone(), payload).await;
            still_syncing(&a, &b, &format!("stranger-{protocol}-{i}")).await;
        }
    }
    assert!(a.admitted_peers().await.unwrap().contains(b.peer_id()));

    // The member that misbehaved is still served once it behaves.
    timeout(T, a.entities().set("light.final", write("on")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&c, "light.final", "on").await;

    for node in [c, b, a] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}

/// Polls A until `user`'s presence has `status`.
async fn wait_presence(a: &Node, user: &str, status: hearth::Status) {
    let deadline = Instant::now() + T;
    loop {
        let now = a.presence().get(Some(user)).await.map(|p| p.status);
        if now.as_ref().ok() == Some(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user} never became {status:?} on A (last: {now:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_device_goes_offline_by_missed_heartbeats_while_still_connected() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    // B needs the home's presence document, which comes from A.
    let deadline = Instant::now() + T;
    while b
        .presence()
        .set(Some("bob"), hearth::Status::Online, None)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "B could never set its presence");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_presence(&a, "bob", hearth::Status::Online).await;

    // B hangs: no heartbeats, no reads, but its connection stays up and answers pings.
    b.debug_stall_network_reads(true);
    wait_presence(&a, "bob", hearth::Status::Offline).await;
    assert!(
        a.admitted_peers().await.unwrap().contains(b.peer_id()),
        "bob went offline only because B disconnected"
    );
    b.debug_stall_network_reads(false);
    wait_presence(&a, "bob", hearth::Status::Online).await;

    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}
