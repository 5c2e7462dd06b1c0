//! A peer that stops reading is dropped; its queue stays within its cap meanwhile.

use std::time::Duration;

use anyhow::{Result, bail};
use hearth_net::{
    Bytes, DeviceIdentity, DisconnectReason, Event, PeerClass, SYNC_QUEUE_BYTES, SYNC_QUEUE_FRAMES,
    SendOutcome,
};
use tokio::time::timeout;

use crate::util::{SOON, config, init_tracing, spawn_auto, spawn_manual, wait_ready};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_dropped_and_others_keep_working() -> Result<()> {
    init_tracing();
    let (a, mut a_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    let (fast, mut fast_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    let (slow, mut slow_stream) = spawn_manual(config(DeviceIdentity::generate())).await?;

    timeout(SOON, fast.handle.add_static_peer(a.addr.clone())).await??;
    timeout(SOON, slow.handle.dial(a.addr.clone())).await??;
    // The slow node reads its events just long enough to admit A, then never again.
    loop {
        match timeout(SOON, slow_stream.recv()).await? {
            Some(Event::Hello { peer, .. }) if peer == a.peer => {
                assert!(timeout(SOON, slow.handle.admit(peer, PeerClass::Own)).await??);
                break;
            }
            Some(_) => continue,
            None => bail!("slow node's events ended"),
        }
    }
    wait_ready(&a, slow.peer).await?;
    wait_ready(&a, fast.peer).await?;

    // Push large frames at the slow peer until A gives up on it, checking all along that
    // the queue never holds more than its caps.
    let frame = Bytes::from(vec![0x5a; 256 * 1024]);
    let mut sent_bytes = 0usize;
    let mut max_frames = 0;
    let mut max_bytes = 0;
    let mut outcome = SendOutcome::Queued;
    for i in 0..4000 {
        outcome = timeout(SOON, a.handle.send(slow.peer, frame.clone())).await??;
        if outcome != SendOutcome::Queued {
            break;
        }
        sent_bytes += frame.len();
        if i % 16 == 0 {
            if let Some(info) = a.info(slow.peer).await? {
                max_frames = max_frames.max(info.queued_frames);
                max_bytes = max_bytes.max(info.queued_bytes);
            }
            // Traffic to a healthy peer is unaffected while the slow one backs up.
            let to_fast =
                timeout(SOON, a.handle.send(fast.peer, Bytes::from(format!("f{i}")))).await??;
            assert_eq!(to_fast, SendOutcome::Queued);
            let got = fast_events.frames_from(a.peer, 1).await?;
            assert_eq!(got, vec![format!("f{i}").into_bytes()]);
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        outcome,
        SendOutcome::SlowPeerDropped,
        "after {sent_bytes} bytes"
    );
    assert!(
        max_frames <= SYNC_QUEUE_FRAMES,
        "queue held {max_frames} frames"
    );
    assert!(
        max_bytes <= SYNC_QUEUE_BYTES,
        "queue held {max_bytes} bytes"
    );
    tracing::info!(sent_bytes, max_bytes, "slow peer dropped");

    let (queued_bytes, reason) = a_events
        .expect(SOON, "SlowPeerDropped then PeerDisconnected", {
            let mut dropped = None;
            move |e| match e {
                Event::SlowPeerDropped {
                    peer, queued_bytes, ..
                } if *peer == slow.peer => {
                    dropped = Some(*queued_bytes);
                    None
                }
                Event::PeerDisconnected { peer, reason } if *peer == slow.peer => {
                    Some((dropped, reason.clone()))
                }
                _ => None,
            }
        })
        .await?;
    let queued_bytes = queued_bytes.expect("SlowPeerDropped came before the disconnection");
    assert!(queued_bytes <= SYNC_QUEUE_BYTES);
    assert_eq!(reason, DisconnectReason::SlowPeer);
    assert_eq!(a.handle.metrics().slow_peers_dropped, 1);

    // Further sends to the dropped peer are refused at once, not queued.
    let again = timeout(SOON, a.handle.send(slow.peer, frame.clone())).await??;
    assert_eq!(again, SendOutcome::NotReady);
    // And the healthy peer still gets everything.
    for i in 0..50 {
        let out = timeout(
            SOON,
            a.handle.send(fast.peer, Bytes::from(format!("after{i}"))),
        )
        .await??;
        assert_eq!(out, SendOutcome::Queued);
    }
    let got = fast_events.frames_from(a.peer, 50).await?;
    assert_eq!(got.last().map(Vec::as_slice), Some(&b"after49"[..]));

    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(slow_stream);
    a.stop().await?;
    fast.stop().await?;
    slow.stop().await?;
    Ok(())
}
