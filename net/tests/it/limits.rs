//! What strangers and misbehaving members cannot exhaust: connection slots per IP
//! address, the slots for unknown peers (the home's own devices always get in), the
//! hello deadline of a peer without a certificate, and the inbound frame budget held by
//! a peer that trickles a frame.
//!
//! Throwaway peers are bare libp2p swarms speaking just the hello exchange and the
//! framed stream protocols, so they can hold connections open and misbehave at will.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{AsyncWriteExt, StreamExt};
use hearth_net::{
    Bytes, Config, DeviceIdentity, DisconnectReason, Event, HELLO_PROTOCOL, MAX_FRAME_SIZE,
    Multiaddr, PeerId, SYNC_PROTOCOL, SendOutcome,
};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity::Keypair, noise, request_response, tcp, yamux};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use crate::util::{
    SOON, TestNode, config, eventually, init_tracing, spawn_auto, spawn_with_policy, wait_ready,
};

/// Wire-compatible with the node's hello message: a CBOR map with one byte string.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    #[serde(with = "serde_bytes")]
    certificate: Vec<u8>,
}

#[derive(NetworkBehaviour)]
struct Raw {
    hello: request_response::cbor::Behaviour<Hello, Hello>,
    streams: libp2p_stream::Behaviour,
}

/// A bare swarm connected (or trying to connect) to one node. It answers the node's
/// hello with `certificate` and, when `send_hello` is set, sends one of its own.
struct RawPeer {
    peer: PeerId,
    control: libp2p_stream::Control,
    /// Fires when its last connection to the node closed.
    closed: tokio::sync::oneshot::Receiver<()>,
    driver: JoinHandle<()>,
}

impl RawPeer {
    fn connect(
        keypair: Keypair,
        target: Multiaddr,
        certificate: Vec<u8>,
        send_hello: bool,
    ) -> Result<Self> {
        let peer = keypair.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| Raw {
                hello: request_response::cbor::Behaviour::new(
                    [(HELLO_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default(),
                ),
                streams: libp2p_stream::Behaviour::new(),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let control = swarm.behaviour().streams.new_control();
        swarm.dial(target)?;
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        let driver = tokio::spawn(async move {
            let mut closed_tx = Some(closed_tx);
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if send_hello => {
                        let hello = Hello {
                            certificate: certificate.clone(),
                        };
                        swarm.behaviour_mut().hello.send_request(&peer_id, hello);
                    }
                    SwarmEvent::Behaviour(RawEvent::Hello(request_response::Event::Message {
                        message: request_response::Message::Request { channel, .. },
                        ..
                    })) => {
                        let hello = Hello {
                            certificate: certificate.clone(),
                        };
                        let _ = swarm.behaviour_mut().hello.send_response(channel, hello);
                    }
                    SwarmEvent::ConnectionClosed {
                        num_established: 0, ..
                    }
                    | SwarmEvent::OutgoingConnectionError { .. } => {
                        if let Some(tx) = closed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Self {
            peer,
            control,
            closed,
            driver,
        })
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A throwaway stranger: fresh identity, answers the hello with no certificate.
fn stranger(target: &TestNode) -> Result<RawPeer> {
    RawPeer::connect(
        Keypair::generate_ed25519(),
        target.addr.clone(),
        Vec::new(),
        false,
    )
}

/// Peers `node` currently holds a session with.
async fn connected(node: &TestNode) -> Result<Vec<PeerId>> {
    let peers = timeout(SOON, node.handle.connected_peers()).await??;
    Ok(peers.into_iter().map(|p| p.peer).collect())
}

/// Waits until `node` holds a session with every one of `peers`.
async fn wait_connected(node: &TestNode, peers: &[PeerId]) -> Result<()> {
    eventually(SOON, "every peer is connected", || async {
        let now = connected(node).await?;
        Ok(peers.iter().all(|p| now.contains(p)))
    })
    .await
}

/// A config whose hello deadlines outlast the test, so strangers hold their slots.
fn patient(identity: DeviceIdentity) -> Config {
    Config {
        hello_timeout: Duration::from_secs(60),
        hello_timeout_no_cert: Duration::from_secs(60),
        ..config(identity)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_ip_cap_are_refused_but_a_vouched_peer_gets_in() -> Result<()> {
    init_tracing();
    let device_id = DeviceIdentity::generate();
    let device_peer = device_id.to_peer_id();
    let node_config = Config {
        max_connections_per_ip: 3,
        ..patient(DeviceIdentity::generate())
    };
    let (node, _events) = spawn_with_policy(node_config, move |p| *p == device_peer).await?;

    // Every test peer dials from 127.0.0.1, so three strangers use up the address.
    let strangers = [stranger(&node)?, stranger(&node)?, stranger(&node)?];
    let ids: Vec<PeerId> = strangers.iter().map(|s| s.peer).collect();
    wait_connected(&node, &ids).await?;

    let mut fourth = stranger(&node)?;
    timeout(SOON, &mut fourth.closed)
        .await
        .context("the fourth connection from one address was kept")??;
    assert_eq!(node.handle.metrics().connections_refused_per_ip, 1);
    assert!(!connected(&node).await?.contains(&fourth.peer));

    // A device the node vouched for is not held to the address's share.
    timeout(SOON, node.handle.reserve_peer(device_peer)).await??;
    let (device, _device_events) = spawn_auto(config(device_id)).await?;
    timeout(SOON, device.handle.dial(node.addr.clone())).await??;
    wait_ready(&node, device.peer).await?;
    assert_eq!(node.handle.metrics().connections_refused_per_ip, 1);
    wait_connected(&node, &ids).await?;

    drop(strangers);
    device.stop().await?;
    node.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_cannot_lock_out_the_homes_own_devices() -> Result<()> {
    init_tracing();
    let static_id = DeviceIdentity::generate();
    let returning_id = DeviceIdentity::generate();
    let (static_peer, returning_peer) = (static_id.to_peer_id(), returning_id.to_peer_id());
    // The node knows the static device by PeerId only; the address it redials is dead,
    // so the device's own dial is the one connection that can come up.
    let dead: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{static_peer}").parse()?;
    let node_config = Config {
        max_unknown_inbound: 4,
        static_peers: vec![dead],
        ..patient(DeviceIdentity::generate())
    };
    let own = move |p: &PeerId| *p == static_peer || *p == returning_peer;
    let (node, mut node_events) = spawn_with_policy(node_config, own).await?;

    // The returning device was admitted once this run, then went away.
    {
        let (returning, _events) = spawn_auto(config(returning_id.clone())).await?;
        timeout(SOON, returning.handle.dial(node.addr.clone())).await??;
        wait_ready(&node, returning_peer).await?;
        returning.stop().await?;
        node_events
            .expect(SOON, "the returning device gone", |e| match e {
                Event::PeerDisconnected { peer, .. } if *peer == returning_peer => Some(()),
                _ => None,
            })
            .await?;
    }

    // Strangers take every unknown slot, and the next one is refused.
    let strangers: Vec<RawPeer> = (0..4).map(|_| stranger(&node)).collect::<Result<_>>()?;
    let ids: Vec<PeerId> = strangers.iter().map(|s| s.peer).collect();
    wait_connected(&node, &ids).await?;
    let mut extra = stranger(&node)?;
    timeout(SOON, &mut extra.closed)
        .await
        .context("a stranger past the unknown cap was kept")??;
    assert_eq!(node.handle.metrics().connections_refused_unknown, 1);

    // The home's devices still connect and are admitted.
    let (device, _device_events) = spawn_auto(config(static_id)).await?;
    timeout(SOON, device.handle.dial(node.addr.clone())).await??;
    let (returning, _returning_events) = spawn_auto(config(returning_id)).await?;
    timeout(SOON, returning.handle.dial(node.addr.clone())).await??;
    wait_ready(&node, static_peer).await?;
    wait_ready(&node, returning_peer).await?;
    assert_eq!(node.handle.metrics().connections_refused_unknown, 1);
    // ... and the strangers kept their slots: the devices were not counted against them.
    wait_connected(&node, &ids).await?;

    drop(strangers);
    device.stop().await?;
    returning.stop().await?;
    node.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_certificate_gets_the_shorter_hello_deadline() -> Result<()> {
    init_tracing();
    let hello_timeout = Duration::from_secs(4);
    let no_cert = Duration::from_millis(800);
    let node_config = Config {
        hello_timeout,
        hello_timeout_no_cert: no_cert,
        ..config(DeviceIdentity::generate())
    };
    let (node, mut node_events) = spawn_with_policy(node_config, |_| false).await?;

    let started = Instant::now();
    let empty = RawPeer::connect(
        Keypair::generate_ed25519(),
        node.addr.clone(),
        Vec::new(),
        true,
    )?;
    let holder = RawPeer::connect(
        Keypair::generate_ed25519(),
        node.addr.clone(),
        b"some certificate".to_vec(),
        true,
    )?;
    let mut hellos = 0;
    let mut empty_cut = None;
    let mut holder_cut = None;
    while empty_cut.is_none() || holder_cut.is_none() {
        let event = node_events
            .expect(SOON, "hellos and hello timeouts", |e| match e {
                Event::Hello { peer, .. } if *peer == empty.peer || *peer == holder.peer => {
                    Some(e.clone())
                }
                Event::PeerDisconnected { peer, .. }
                    if *peer == empty.peer || *peer == holder.peer =>
                {
                    Some(e.clone())
                }
                _ => None,
            })
            .await?;
        match event {
            Event::Hello { .. } => hellos += 1,
            Event::PeerDisconnected { peer, reason } => {
                assert_eq!(reason, DisconnectReason::HelloTimeout);
                let at = started.elapsed();
                if peer == empty.peer {
                    // The certificate holder must still be there when the other is cut.
                    assert!(holder_cut.is_none(), "the certificate holder went first");
                    empty_cut = Some(at);
                } else {
                    holder_cut = Some(at);
                }
            }
            _ => {}
        }
    }
    let (empty_cut, holder_cut) = (
        empty_cut.unwrap_or_default(),
        holder_cut.unwrap_or_default(),
    );
    assert_eq!(hellos, 2, "both peers said hello");
    assert!(
        empty_cut >= no_cert - Duration::from_millis(100)
            && empty_cut < hello_timeout - Duration::from_secs(1),
        "the peer without a certificate was cut at {empty_cut:?}"
    );
    assert!(
        holder_cut >= hello_timeout - Duration::from_millis(100),
        "the certificate holder was cut at {holder_cut:?}, before {hello_timeout:?}"
    );
    assert_eq!(node.handle.metrics().hello_timeouts, 2);
    drop((empty, holder));
    node.stop().await?;
    Ok(())
}

/// Announces a whole-size frame, then sends a kilobyte every 50 ms: 80 s to finish.
async fn trickle(mut stream: libp2p::Stream) -> std::io::Result<()> {
    stream
        .write_all(&(MAX_FRAME_SIZE as u32).to_be_bytes())
        .await?;
    loop {
        stream.write_all(&[0x42; 1024]).await?;
        stream.flush().await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_trickling_a_large_frame_is_dropped_and_others_keep_flowing() -> Result<()> {
    init_tracing();
    let read_timeout = Duration::from_secs(2);
    let node_config = Config {
        frame_read_timeout: read_timeout,
        ..config(DeviceIdentity::generate())
    };
    let (node, mut node_events) = spawn_auto(node_config).await?;
    let (friend, _friend_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    timeout(SOON, friend.handle.add_static_peer(node.addr.clone())).await??;
    wait_ready(&node, friend.peer).await?;

    // The trickler must hold the smaller PeerId: only that side opens the sync stream.
    let keypair = loop {
        let k = Keypair::generate_ed25519();
        if k.public().to_peer_id().to_bytes() < node.peer.to_bytes() {
            break k;
        }
    };
    let mut trickler = RawPeer::connect(keypair, node.addr.clone(), b"member".to_vec(), true)?;
    let trickler_peer = trickler.peer;
    eventually(SOON, "the trickler is admitted", || async {
        Ok(node.info(trickler_peer).await?.is_some_and(|i| i.admitted))
    })
    .await?;
    let stream = timeout(SOON, trickler.control.open_stream(node.peer, SYNC_PROTOCOL))
        .await
        .context("opening the sync stream timed out")?
        .map_err(|e| anyhow!("opening the sync stream: {e}"))?;
    let trickle = tokio::spawn(trickle(stream));
    let started = Instant::now();

    // The friend keeps sending while the trickler holds its frame open.
    let pusher = {
        let handle = friend.handle.clone();
        let target = node.peer;
        tokio::spawn(async move {
            for i in 0u32.. {
                let out = timeout(
                    SOON,
                    handle.send(target, Bytes::from(i.to_be_bytes().to_vec())),
                )
                .await;
                if !matches!(out, Ok(Ok(SendOutcome::Queued))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut friend_frames = 0;
    let reason = loop {
        // The friend's frames keep coming, so bound the whole wait, not each event.
        if started.elapsed() > read_timeout + SOON {
            bail!(
                "the trickler was still connected after {:?}",
                started.elapsed()
            );
        }
        let event = node_events
            .expect(SOON, "the trickler's disconnection", |e| match e {
                Event::Frame { peer, .. } if *peer == friend.peer => Some(None),
                Event::Frame { peer, .. } if *peer == trickler_peer => {
                    Some(Some(Err(anyhow!("the trickled frame was delivered"))))
                }
                Event::PeerDisconnected { peer, reason } if *peer == trickler_peer => {
                    Some(Some(Ok(reason.clone())))
                }
                _ => None,
            })
            .await?;
        match event {
            None => friend_frames += 1,
            Some(result) => break result?,
        }
    };
    let elapsed = started.elapsed();
    match &reason {
        DisconnectReason::MalformedFrame(why) if why.contains("not complete within") => {}
        other => bail!("expected a frame read timeout, got {other:?}"),
    }
    assert!(
        elapsed >= read_timeout - Duration::from_millis(200),
        "cut at {elapsed:?}"
    );
    assert!(
        elapsed < read_timeout + Duration::from_secs(5),
        "cut at {elapsed:?}"
    );
    assert!(
        friend_frames > 0,
        "no frame from the friend while the trickler held its frame"
    );
    timeout(SOON, &mut trickler.closed)
        .await
        .context("the trickler's connection stayed up")??;
    let metrics = node.handle.metrics();
    assert_eq!(metrics.frame_read_timeouts, 1, "{metrics:?}");

    // The friend's stream was never disturbed, and still carries frames.
    let before = friend_frames;
    node_events
        .expect(SOON, "a frame from the friend after the cut", |e| match e {
            Event::Frame { peer, .. } if *peer == friend.peer => Some(()),
            _ => None,
        })
        .await?;
    assert!(before > 0);
    let info = node.info(friend.peer).await?.context("friend connected")?;
    assert_eq!(info.sync_streams, 1);

    pusher.abort();
    trickle.abort();
    drop(trickler);
    friend.stop().await?;
    node.stop().await?;
    Ok(())
}
