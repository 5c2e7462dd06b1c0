//! Dialing that always connects: simultaneous mutual static dials and restarts.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_net::{Bytes, DeviceIdentity, Event, SendOutcome};
use tokio::time::timeout;

use crate::util::{
    Events, SOON, TestNode, config, eventually, init_tracing, spawn_auto, wait_ready,
};

/// Sends one frame each way and waits for both to arrive.
async fn ping_pong(
    a: &TestNode,
    a_events: &mut Events,
    b: &TestNode,
    b_events: &mut Events,
    tag: &str,
) -> Result<()> {
    let out = timeout(
        SOON,
        a.handle.send(b.peer, Bytes::from(format!("{tag}-ab"))),
    )
    .await??;
    ensure!(out == SendOutcome::Queued, "A->B not queued: {out:?}");
    let out = timeout(
        SOON,
        b.handle.send(a.peer, Bytes::from(format!("{tag}-ba"))),
    )
    .await??;
    ensure!(out == SendOutcome::Queued, "B->A not queued: {out:?}");
    let at_b = b_events.frames_from(a.peer, 1).await?;
    let at_a = a_events.frames_from(b.peer, 1).await?;
    ensure!(
        at_b == vec![format!("{tag}-ab").into_bytes()],
        "B got {at_b:?}"
    );
    ensure!(
        at_a == vec![format!("{tag}-ba").into_bytes()],
        "A got {at_a:?}"
    );
    Ok(())
}

async fn connections(node: &TestNode, peer: hearth_net::PeerId) -> Result<usize> {
    Ok(node.info(peer).await?.map_or(0, |i| i.connections))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_mutual_static_dials_always_end_with_one_connection() -> Result<()> {
    init_tracing();
    const RUNS: usize = 20;
    let mut duplicates_closed = 0;
    for run in 0..RUNS {
        let (a, mut a_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
        let (b, mut b_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
        // Both sides learn of each other at the same instant and both dial.
        let (ra, rb) = tokio::join!(
            a.handle.add_static_peer(b.addr.clone()),
            b.handle.add_static_peer(a.addr.clone()),
        );
        ra?;
        rb?;
        wait_ready(&a, b.peer)
            .await
            .with_context(|| format!("run {run}: A"))?;
        wait_ready(&b, a.peer)
            .await
            .with_context(|| format!("run {run}: B"))?;
        ping_pong(&a, &mut a_events, &b, &mut b_events, &format!("run{run}"))
            .await
            .with_context(|| format!("run {run}: frames"))?;

        eventually(SOON, "both sides hold exactly one connection", || async {
            Ok(connections(&a, b.peer).await? == 1 && connections(&b, a.peer).await? == 1)
        })
        .await
        .with_context(|| format!("run {run}"))?;
        // And it stays that way: no late duplicate, no flapping.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(connections(&a, b.peer).await?, 1, "run {run}: A");
        assert_eq!(connections(&b, a.peer).await?, 1, "run {run}: B");
        ping_pong(
            &a,
            &mut a_events,
            &b,
            &mut b_events,
            &format!("run{run}-after"),
        )
        .await
        .with_context(|| format!("run {run}: frames after settling"))?;

        duplicates_closed += a.handle.metrics().duplicate_connections_closed
            + b.handle.metrics().duplicate_connections_closed;
        a.stop().await?;
        b.stop().await?;
    }
    tracing::info!(duplicates_closed, "mutual dial runs done");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_static_peer_is_redialled() -> Result<()> {
    init_tracing();
    let b_identity = DeviceIdentity::generate();
    let (a, mut a_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    let (b, mut b_events) = spawn_auto(config(b_identity.clone())).await?;
    let b_port = b.port();
    let b_peer = b.peer;
    timeout(SOON, a.handle.add_static_peer(b.addr.clone())).await??;
    wait_ready(&a, b_peer).await?;
    wait_ready(&b, a.peer).await?;
    ping_pong(&a, &mut a_events, &b, &mut b_events, "before").await?;

    // Stop B entirely; A must notice within the liveness bound.
    b.stop().await?;
    drop(b_events);
    a_events
        .expect(Duration::from_secs(5), "B's departure", |e| match e {
            Event::PeerDisconnected { peer, .. } if *peer == b_peer => Some(()),
            _ => None,
        })
        .await?;

    // Let a couple of redials fail against the closed port, then bring B back on it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b_config = hearth_net::Config {
        listen: vec![format!("/ip4/127.0.0.1/tcp/{b_port}").parse()?],
        ..config(b_identity)
    };
    let (b, mut b_events) = spawn_auto(b_config).await?;
    assert_eq!(b.peer, b_peer, "same identity, same PeerId");

    // Only A knows B as static: the reconnection is A's redial.
    a_events
        .expect(SOON, "B reconnected", |e| match e {
            Event::Hello { peer, .. } if *peer == b_peer => Some(()),
            _ => None,
        })
        .await?;
    wait_ready(&a, b_peer).await?;
    wait_ready(&b, a.peer).await?;
    ping_pong(&a, &mut a_events, &b, &mut b_events, "after").await?;
    assert!(
        a.info(b_peer)
            .await?
            .is_some_and(|i| i.is_static && i.connections == 1)
    );

    a.stop().await?;
    b.stop().await?;
    Ok(())
}

/// A TCP relay on loopback that can be told to go silent: it keeps both sockets open but
/// stops forwarding, which is how a peer that lost power or network looks from outside.
struct Blackhole {
    port: u16,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Blackhole {
    async fn start(target_port: u16) -> Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let silent = Arc::new(AtomicBool::new(false));
        let flag = silent.clone();
        let acceptor = tokio::spawn(async move {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
            else {
                return;
            };
            let (in_r, in_w) = inbound.into_split();
            let (out_r, out_w) = outbound.into_split();
            let pump = |mut r: tokio::net::tcp::OwnedReadHalf,
                        mut w: tokio::net::tcp::OwnedWriteHalf,
                        flag: Arc<AtomicBool>| async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if flag.load(Ordering::SeqCst) {
                        // Hold both halves open and swallow everything from now on.
                        let _keep = (r, w);
                        std::future::pending::<()>().await;
                        return;
                    }
                    if w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            };
            let up = tokio::spawn(pump(in_r, out_w, flag.clone()));
            let down = tokio::spawn(pump(out_r, in_w, flag));
            let _ = tokio::join!(up, down);
        });
        Ok(Self {
            port,
            silent,
            tasks: vec![acceptor],
        })
    }

    fn go_silent(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_vanished_peer_is_noticed_by_ping_within_five_seconds() -> Result<()> {
    init_tracing();
    let (a, mut a_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    let (b, _b_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    let relay = Blackhole::start(b.port()).await?;
    let via_relay: hearth_net::Multiaddr =
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", relay.port, b.peer).parse()?;
    timeout(SOON, a.handle.dial(via_relay)).await??;
    wait_ready(&a, b.peer).await?;

    // No FIN, no RST: the link just stops carrying bytes.
    relay.go_silent();
    let started = tokio::time::Instant::now();
    let reason = a_events
        .expect(Duration::from_secs(5), "B's departure", |e| match e {
            Event::PeerDisconnected { peer, reason } if *peer == b.peer => Some(reason.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(reason, hearth_net::DisconnectReason::PingTimeout);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(a.info(b.peer).await?.is_none());
    drop(relay);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}
