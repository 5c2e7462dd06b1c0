//! Hello exchange, admission, and frames over the single long-lived stream.

use std::time::Duration;

use anyhow::Result;
use hearth_net::{Bytes, DeviceIdentity, DisconnectReason, Event, PeerClass, SendOutcome};
use tokio::time::{Instant, timeout};

use crate::util::{
    SOON, config, init_tracing, ordered_identities, spawn_auto, spawn_with_policy, wait_ready,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_peers_swap_certificates_and_frames_flow_over_one_stream() -> Result<()> {
    init_tracing();
    let (a, mut a_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    let (b, mut b_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    timeout(SOON, b.handle.add_static_peer(a.addr.clone())).await??;

    // Each side receives exactly the other's certificate bytes.
    let cert_at_a = a_events
        .expect(SOON, "B's hello at A", |e| match e {
            Event::Hello { peer, certificate } if *peer == b.peer => Some(certificate.clone()),
            _ => None,
        })
        .await?;
    let cert_at_b = b_events
        .expect(SOON, "A's hello at B", |e| match e {
            Event::Hello { peer, certificate } if *peer == a.peer => Some(certificate.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(cert_at_a, format!("cert-of-{}", b.peer).into_bytes());
    assert_eq!(cert_at_b, format!("cert-of-{}", a.peer).into_bytes());

    wait_ready(&a, b.peer).await?;
    wait_ready(&b, a.peer).await?;

    // Interleave both directions so the one stream carries traffic each way at once.
    const N: usize = 200;
    for i in 0..N {
        let to_b = timeout(SOON, a.handle.send(b.peer, Bytes::from(format!("a{i}")))).await??;
        let to_a = timeout(SOON, b.handle.send(a.peer, Bytes::from(format!("b{i}")))).await??;
        assert_eq!((to_b, to_a), (SendOutcome::Queued, SendOutcome::Queued));
    }
    let at_b = b_events.frames_from(a.peer, N).await?;
    let at_a = a_events.frames_from(b.peer, N).await?;
    let expect = |p: &str| {
        (0..N)
            .map(|i| format!("{p}{i}").into_bytes())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        at_b,
        expect("a"),
        "A's frames arrive at B complete and in order"
    );
    assert_eq!(
        at_a,
        expect("b"),
        "B's frames arrive at A complete and in order"
    );

    // Ephemeral messages use their own stream and event.
    let sent = timeout(
        SOON,
        a.handle
            .send_ephemeral(b.peer, Bytes::from_static(b"typing")),
    )
    .await??;
    assert_eq!(sent, SendOutcome::Queued);
    let eph = b_events
        .expect(SOON, "an ephemeral frame", |e| match e {
            Event::EphemeralFrame { peer, bytes, .. } if *peer == a.peer => Some(bytes.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(&eph[..], b"typing");

    // One sync stream on each side, one connection, and the opener rule held: exactly one
    // side opened the two streams and the other accepted them.
    for (node, other) in [(&a, b.peer), (&b, a.peer)] {
        let info = node.info(other).await?.expect("still connected");
        assert_eq!(info.sync_streams, 1, "{info:?}");
        assert_eq!(info.connections, 1, "{info:?}");
    }
    let (ma, mb) = (a.handle.metrics(), b.handle.metrics());
    assert_eq!(ma.streams_opened + mb.streams_opened, 2, "{ma:?} {mb:?}");
    assert_eq!(
        ma.streams_accepted + mb.streams_accepted,
        2,
        "{ma:?} {mb:?}"
    );
    assert!(ma.frames_received >= N as u64 && mb.frames_received > N as u64);

    a.stop().await?;
    b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unadmitted_peer_is_cut_at_the_hello_timeout_and_its_frames_never_arrive() -> Result<()> {
    init_tracing();
    // The intruder has the smaller PeerId, so it is the side that opens the sync stream
    // and can push frames at the guard before being admitted.
    let (intruder_id, guard_id) = ordered_identities();
    let hello_timeout = Duration::from_millis(1500);
    let guard_config = hearth_net::Config {
        hello_timeout,
        ..config(guard_id)
    };
    let (guard, mut guard_events) = spawn_with_policy(guard_config, |_| false).await?;
    let (intruder, mut intruder_events) = spawn_auto(config(intruder_id)).await?;
    let started = Instant::now();
    timeout(SOON, intruder.handle.add_static_peer(guard.addr.clone())).await??;

    guard_events
        .expect(SOON, "the intruder's hello", |e| match e {
            Event::Hello { peer, .. } if *peer == intruder.peer => Some(()),
            _ => None,
        })
        .await?;
    intruder_events
        .expect(SOON, "the guard's hello", |e| match e {
            Event::Hello { peer, .. } if *peer == guard.peer => Some(()),
            _ => None,
        })
        .await?;

    // The intruder admitted the guard, so its sends are queued and its side opens the
    // stream; the guard must never deliver any of it.
    let pusher = {
        let handle = intruder.handle.clone();
        let target = guard.peer;
        tokio::spawn(async move {
            let mut queued = 0u32;
            for i in 0..200u32 {
                if let Ok(Ok(SendOutcome::Queued)) = timeout(
                    SOON,
                    handle.send(target, Bytes::from(i.to_be_bytes().to_vec())),
                )
                .await
                {
                    queued += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            queued
        })
    };

    let reason = guard_events
        .expect(SOON, "the intruder's disconnection", |e| match e {
            Event::Frame { peer, .. } if *peer == intruder.peer => Some(Err(anyhow::anyhow!(
                "a frame from an unadmitted peer was delivered"
            ))),
            Event::PeerDisconnected { peer, reason } if *peer == intruder.peer => {
                Some(Ok(reason.clone()))
            }
            _ => None,
        })
        .await??;
    let elapsed = started.elapsed();
    assert_eq!(reason, DisconnectReason::HelloTimeout);
    assert!(
        elapsed >= hello_timeout - Duration::from_millis(100),
        "cut too early: {elapsed:?}"
    );
    assert!(
        elapsed < hello_timeout + Duration::from_secs(3),
        "cut too late: {elapsed:?}"
    );

    // While the intruder keeps redialling and pushing, nothing from it is ever delivered.
    let seen = guard_events
        .refute(
            Duration::from_secs(2),
            "frame from an unadmitted peer",
            |e| matches!(e, Event::Frame { peer, .. } if *peer == intruder.peer),
        )
        .await?;
    let queued = timeout(SOON, pusher).await??;
    assert!(queued > 0, "the intruder did queue frames for the guard");
    let metrics = guard.handle.metrics();
    assert!(metrics.hello_timeouts >= 1, "{metrics:?}");
    assert_eq!(metrics.frames_received, 0, "{metrics:?}");
    tracing::debug!(events = seen.len(), "guard events after the cut");

    guard.stop().await?;
    intruder.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_peer_is_disconnected_with_the_reason() -> Result<()> {
    init_tracing();
    let (a, mut a_events) =
        spawn_with_policy(config(DeviceIdentity::generate()), |_| false).await?;
    let (b, mut b_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    timeout(SOON, b.handle.dial(a.addr.clone())).await??;
    a_events
        .expect(SOON, "B's hello", |e| match e {
            Event::Hello { peer, .. } if *peer == b.peer => Some(()),
            _ => None,
        })
        .await?;
    assert!(timeout(SOON, a.handle.reject(b.peer, "unknown home")).await??);
    let reason = a_events
        .expect(SOON, "B's disconnection", |e| match e {
            Event::PeerDisconnected { peer, reason } if *peer == b.peer => Some(reason.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(reason, DisconnectReason::Rejected("unknown home".into()));
    b_events
        .expect(SOON, "A gone at B", |e| match e {
            Event::PeerDisconnected { peer, .. } if *peer == a.peer => Some(()),
            _ => None,
        })
        .await?;
    // A peer that is gone can be neither admitted nor sent to.
    assert!(!timeout(SOON, a.handle.admit(b.peer, PeerClass::Own)).await??);
    let sent = timeout(SOON, a.handle.send(b.peer, Bytes::from_static(b"x"))).await??;
    assert_eq!(sent, SendOutcome::NotReady);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}
