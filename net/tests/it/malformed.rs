//! Garbage on the sync protocol closes that peer's stream and connection; the node keeps
//! serving everyone else.
//!
//! The attacker is a bare libp2p swarm speaking just enough of Hearth (the hello exchange
//! and the sync protocol) to be admitted, then writing bytes no Hearth node would send.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::{AsyncWriteExt, StreamExt};
use hearth_net::{
    Bytes, DeviceIdentity, DisconnectReason, Event, HELLO_PROTOCOL, MAX_FRAME_SIZE, Multiaddr,
    PeerId, SYNC_PROTOCOL, SendOutcome,
};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity::Keypair, noise, request_response, tcp, yamux};
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

use crate::util::{SOON, config, init_tracing, spawn_auto, wait_ready};

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

/// Connects as `keypair`, completes the hello exchange, opens the sync stream and writes
/// `payload` on it, then keeps the swarm running until the node hangs up.
async fn attack(
    keypair: Keypair,
    target: Multiaddr,
    target_peer: PeerId,
    payload: Vec<u8>,
) -> Result<()> {
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
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    let mut control = swarm.behaviour().streams.new_control();
    swarm.dial(target)?;

    // Drive the swarm in the background while the stream is opened and written.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let driver = tokio::spawn(async move {
        let mut closed_tx = Some(closed_tx);
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    swarm.behaviour_mut().hello.send_request(
                        &peer_id,
                        Hello {
                            certificate: b"attacker".to_vec(),
                        },
                    );
                }
                SwarmEvent::Behaviour(RawEvent::Hello(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. },
                    ..
                })) => {
                    let _ = swarm.behaviour_mut().hello.send_response(
                        channel,
                        Hello {
                            certificate: b"attacker".to_vec(),
                        },
                    );
                }
                SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } => {
                    if let Some(tx) = closed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
        }
    });

    let mut stream = timeout(SOON, control.open_stream(target_peer, SYNC_PROTOCOL))
        .await
        .context("opening the sync stream timed out")?
        .map_err(|e| anyhow!("opening the sync stream: {e}"))?;
    stream.write_all(&payload).await?;
    stream.flush().await?;
    // Half-close, so a truncated frame is seen as truncated rather than as slow.
    stream.close().await?;
    let hung_up = timeout(SOON, closed_rx).await;
    driver.abort();
    hung_up.context("the node never hung up on the attacker")??;
    Ok(())
}

/// Deterministic noise whose first byte is non-zero, so its length prefix is far above
/// the frame cap.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    out[0] |= 0x80;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_sync_stream_drops_that_peer_and_the_node_keeps_serving() -> Result<()> {
    init_tracing();
    let (node, mut node_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    let (friend, mut friend_events) = spawn_auto(config(DeviceIdentity::generate())).await?;
    timeout(SOON, friend.handle.add_static_peer(node.addr.clone())).await??;
    wait_ready(&node, friend.peer).await?;

    let oversized = (MAX_FRAME_SIZE as u32 + 1).to_be_bytes().to_vec();
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(b"only ten b");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("random bytes", random_bytes(4096), "exceeds"),
        ("oversized length prefix", oversized, "exceeds"),
        ("truncated frame", truncated, "truncated"),
    ];

    for (round, (name, payload, expect_in_reason)) in cases.into_iter().enumerate() {
        // The attacker must hold the smaller PeerId: only that side opens the sync stream.
        let keypair = loop {
            let k = Keypair::generate_ed25519();
            if k.public().to_peer_id().to_bytes() < node.peer.to_bytes() {
                break k;
            }
        };
        let attacker = keypair.public().to_peer_id();
        attack(keypair, node.addr.clone(), node.peer, payload)
            .await
            .with_context(|| name.to_string())?;

        let reason = node_events
            .expect(SOON, "the attacker's disconnection", |e| match e {
                Event::PeerDisconnected { peer, reason } if *peer == attacker => {
                    Some(reason.clone())
                }
                Event::Frame { peer, .. } if *peer == attacker => {
                    panic!("{name}: a malformed frame was delivered")
                }
                _ => None,
            })
            .await?;
        match &reason {
            DisconnectReason::MalformedFrame(why) => {
                assert!(why.contains(expect_in_reason), "{name}: {why}");
            }
            other => panic!("{name}: expected a malformed-frame disconnect, got {other:?}"),
        }
        assert_eq!(node.handle.metrics().malformed_frames, round as u64 + 1);

        // The node still serves its friend, both ways.
        let tag = format!("still-here-{round}");
        let out = timeout(
            SOON,
            node.handle.send(friend.peer, Bytes::from(tag.clone())),
        )
        .await??;
        assert_eq!(out, SendOutcome::Queued);
        assert_eq!(
            friend_events.frames_from(node.peer, 1).await?,
            vec![tag.clone().into_bytes()]
        );
        let out = timeout(
            SOON,
            friend.handle.send(node.peer, Bytes::from(tag.clone())),
        )
        .await??;
        assert_eq!(out, SendOutcome::Queued);
        assert_eq!(
            node_events.frames_from(friend.peer, 1).await?,
            vec![tag.into_bytes()]
        );
    }
    let info = node
        .info(friend.peer)
        .await?
        .expect("friend still connected");
    assert_eq!(
        info.sync_streams, 1,
        "the friend's stream was never disturbed"
    );

    node.stop().await?;
    friend.stop().await?;
    Ok(())
}
