//! `/hearth/pair/1`: multi-round exchanges before admission, the bounded extension of the
//! hello deadline, the rate limit and capacity caps, and hostile input.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use hearth_net::{
    Bytes, Config, DeviceIdentity, DisconnectReason, Error, Event, EventStream, Handle,
    MAX_PAIR_MESSAGE_SIZE, MAX_PAIRING_PEERS, Multiaddr, PAIR_PROTOCOL, PAIR_RATE_BURST,
    PAIR_RATE_INTERVAL, PeerId, Protocol, SendOutcome,
};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::util::{
    SOON, TestNode, config, eventually, init_tracing, pairing_answer, spawn_pairing, wait_ready,
};

/// A joiner as `hearth join` builds it: no node, no listen address, no static peers, no
/// mDNS and no certificate yet.
struct Joiner {
    handle: Handle,
    peer: PeerId,
    /// Held so the event loop's event channel stays open, as the real joiner does.
    _events: EventStream,
    cancel: CancellationToken,
    join: JoinHandle<()>,
}

impl Joiner {
    fn start() -> Result<Self> {
        let config = Config {
            identity: DeviceIdentity::generate(),
            listen: Vec::new(),
            mdns: false,
            ..Config::default()
        };
        assert!(config.certificate.is_empty() && config.static_peers.is_empty());
        let (handle, events, event_loop) = hearth_net::new(config)?;
        let cancel = CancellationToken::new();
        let join = tokio::spawn(event_loop.run(cancel.clone()));
        Ok(Self {
            peer: handle.local_peer_id(),
            handle,
            _events: events,
            cancel,
            join,
        })
    }

    async fn pair(&self, peer: PeerId, addr: Option<Multiaddr>, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(timeout(SOON, self.handle.pair_request(peer, addr, bytes.to_vec())).await??)
    }

    async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        timeout(SOON, self.join)
            .await
            .context("joiner event loop did not stop")??;
        Ok(())
    }
}

/// The issuer's address as an invite code carries it: no `/p2p/` suffix.
fn bare_addr(node: &TestNode) -> Multiaddr {
    let mut addr = node.addr.clone();
    addr.pop();
    addr
}

/// An issuer that answers every pairing message and admits nobody.
async fn spawn_issuer(config: Config) -> Result<(TestNode, crate::util::Events)> {
    spawn_pairing(config, |_| false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_joiner_completes_three_rounds_and_shuts_down_cleanly() -> Result<()> {
    init_tracing();
    let (issuer, mut issuer_events) = spawn_issuer(config(DeviceIdentity::generate())).await?;
    let joiner = Joiner::start()?;

    // Round one dials the address from the code; later rounds reuse the connection.
    let rounds: [&[u8]; 3] = [b"spake2 start", b"confirm", b"ack grant"];
    for (i, round) in rounds.iter().enumerate() {
        let addr = (i == 0).then(|| bare_addr(&issuer));
        let answer = joiner.pair(issuer.peer, addr, round).await?;
        assert_eq!(answer, pairing_answer(round), "round {i} answered in turn");
    }

    // The issuer saw an empty certificate and the three messages in order. The hello and
    // the first message travel on different protocols, so either may come first.
    let mut certificate = None;
    let mut seen = Vec::new();
    while certificate.is_none() || seen.len() < rounds.len() {
        let event = issuer_events
            .expect(SOON, "the joiner's hello and messages", |e| match e {
                Event::Hello { peer, .. } | Event::PairRequest { peer, .. }
                    if *peer == joiner.peer =>
                {
                    Some(e.clone())
                }
                _ => None,
            })
            .await?;
        match event {
            Event::Hello { certificate: c, .. } => certificate = Some(c),
            Event::PairRequest { bytes, .. } => seen.push(bytes),
            _ => unreachable!("filtered above"),
        }
    }
    assert_eq!(
        certificate,
        Some(Vec::new()),
        "a joiner has no certificate yet"
    );
    assert_eq!(seen, rounds.map(<[u8]>::to_vec));
    let info = issuer
        .info(joiner.peer)
        .await?
        .ok_or_else(|| anyhow!("joiner not connected at the issuer"))?;
    assert!(info.pairing && !info.admitted && !info.sync_stream_open);
    assert_eq!(info.connections, 1);
    assert_eq!(issuer.handle.metrics().pair_requests_received, 3);

    // Shutting the joiner down ends the session at the issuer, which keeps serving.
    let handle = joiner.handle.clone();
    let joiner_peer = joiner.peer;
    joiner.stop().await?;
    let reason = issuer_events
        .expect(SOON, "the joiner's disconnection", |e| match e {
            Event::PeerDisconnected { peer, reason } if *peer == joiner_peer => {
                Some(reason.clone())
            }
            _ => None,
        })
        .await?;
    assert_eq!(reason, DisconnectReason::ConnectionClosed);
    assert!(matches!(
        handle
            .pair_request(issuer.peer, None, b"late".to_vec())
            .await,
        Err(Error::Shutdown)
    ));
    let again = Joiner::start()?;
    assert_eq!(
        again
            .pair(issuer.peer, Some(issuer.addr.clone()), b"next")
            .await?,
        pairing_answer(b"next")
    );
    again.stop().await?;
    issuer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_keeps_a_non_admitted_peer_past_hello_timeout_but_not_past_the_bound() -> Result<()>
{
    init_tracing();
    const HELLO: Duration = Duration::from_secs(1);
    const BOUND: Duration = Duration::from_secs(4);
    let (issuer, mut issuer_events) = spawn_issuer(Config {
        hello_timeout: HELLO,
        pairing_max_duration: BOUND,
        ..config(DeviceIdentity::generate())
    })
    .await?;
    let joiner = Joiner::start()?;

    let started = Instant::now();
    joiner
        .pair(issuer.peer, Some(bare_addr(&issuer)), b"round 0")
        .await?;
    // Keep the exchange going, well inside each extension and within the rate limit,
    // until the issuer cuts it.
    let mut last_ok = started.elapsed();
    let mut rounds = 1;
    let failure = loop {
        sleep(Duration::from_millis(600)).await;
        match timeout(
            SOON,
            joiner
                .handle
                .pair_request(issuer.peer, None, b"again".to_vec()),
        )
        .await?
        {
            Ok(_) => {
                last_ok = started.elapsed();
                rounds += 1;
                // Still nothing but pairing: no stream for frames either way.
                let sent =
                    timeout(SOON, joiner.handle.send(issuer.peer, Bytes::from("x"))).await??;
                assert_eq!(sent, SendOutcome::NotReady);
            }
            Err(error @ Error::PairRefused { .. }) => bail!("refused: {error}"),
            Err(error) => break error,
        }
        if started.elapsed() > BOUND * 3 {
            bail!(
                "still connected {:?} after starting to pair",
                started.elapsed()
            );
        }
    };
    let reason = issuer_events
        .expect(SOON, "the joiner's disconnection", |e| match e {
            Event::PeerDisconnected { peer, reason } if *peer == joiner.peer => {
                Some(reason.clone())
            }
            _ => None,
        })
        .await?;
    let cut_at = started.elapsed();
    assert_eq!(reason, DisconnectReason::HelloTimeout);
    assert!(
        last_ok >= BOUND - HELLO,
        "pairing held the connection well past the {HELLO:?} hello timeout \
         (last answer at {last_ok:?}, {rounds} rounds)"
    );
    assert!(
        cut_at <= BOUND + Duration::from_millis(1500),
        "the bound of {BOUND:?} still applied (cut at {cut_at:?})"
    );
    assert!(
        matches!(
            failure,
            Error::NotConnected { .. } | Error::PairFailed { .. }
        ),
        "{failure}"
    );
    assert_eq!(issuer.handle.metrics().hello_timeouts, 1);
    joiner.stop().await?;
    issuer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_requests_beyond_the_rate_limit_are_refused() -> Result<()> {
    init_tracing();
    let (issuer, _issuer_events) = spawn_issuer(config(DeviceIdentity::generate())).await?;
    let joiner = Joiner::start()?;
    let addr = Some(bare_addr(&issuer));

    let started = Instant::now();
    let (mut answered, mut refused) = (0u64, 0u64);
    for i in 0..PAIR_RATE_BURST * 3 {
        let addr = if i == 0 { addr.clone() } else { None };
        match timeout(SOON, joiner.handle.pair_request(issuer.peer, addr, vec![1])).await? {
            Ok(answer) => {
                assert_eq!(answer, pairing_answer(&[1]));
                answered += 1;
            }
            Err(Error::PairRefused { peer, reason }) => {
                assert_eq!(peer, issuer.peer);
                assert!(reason.contains("rate limited"), "{reason}");
                refused += 1;
            }
            Err(other) => bail!("unexpected pairing error: {other}"),
        }
    }
    let elapsed = started.elapsed();
    let refills = (elapsed.as_secs_f64() / PAIR_RATE_INTERVAL.as_secs_f64()).ceil() as u64;
    assert!(
        answered >= u64::from(PAIR_RATE_BURST),
        "the burst itself passes"
    );
    assert!(
        answered <= u64::from(PAIR_RATE_BURST) + refills,
        "{answered} answered in {elapsed:?}"
    );
    assert!(refused >= 1, "requests past the burst are refused");
    let metrics = issuer.handle.metrics();
    assert_eq!(
        metrics.pair_requests_received, answered,
        "refusals never reach the node"
    );
    assert_eq!(metrics.pair_requests_refused, refused);

    // The budget comes back with time, on the same connection.
    sleep(PAIR_RATE_INTERVAL + Duration::from_millis(200)).await;
    assert_eq!(
        joiner.pair(issuer.peer, None, b"later").await?,
        pairing_answer(b"later")
    );
    joiner.stop().await?;
    issuer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_peers_are_capped() -> Result<()> {
    init_tracing();
    // Every joiner dials from 127.0.0.1; lift the per-address cap so the pairing cap is
    // the one that answers.
    let issuer_config = Config {
        max_connections_per_ip: 2 * MAX_PAIRING_PEERS as u32,
        ..config(DeviceIdentity::generate())
    };
    let (issuer, _issuer_events) = spawn_issuer(issuer_config).await?;
    let mut joiners = Vec::new();
    for _ in 0..MAX_PAIRING_PEERS {
        let joiner = Joiner::start()?;
        joiner
            .pair(issuer.peer, Some(bare_addr(&issuer)), b"hi")
            .await?;
        joiners.push(joiner);
    }
    let extra = Joiner::start()?;
    match timeout(
        SOON,
        extra
            .handle
            .pair_request(issuer.peer, Some(bare_addr(&issuer)), b"hi".to_vec()),
    )
    .await?
    {
        Err(Error::PairRefused { reason, .. }) => assert!(reason.contains("busy"), "{reason}"),
        other => bail!("expected a refusal for one peer too many, got {other:?}"),
    }
    // Those already pairing carry on.
    assert_eq!(
        joiners[0].pair(issuer.peer, None, b"round 2").await?,
        pairing_answer(b"round 2")
    );
    extra.stop().await?;
    for joiner in joiners {
        joiner.stop().await?;
    }
    issuer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_peers_may_pair_and_keep_syncing() -> Result<()> {
    init_tracing();
    let (a, _a_events) = spawn_pairing(config(DeviceIdentity::generate()), |_| true).await?;
    let (b, mut b_events) = spawn_pairing(config(DeviceIdentity::generate()), |_| true).await?;
    // An address with the /p2p suffix dials too; the pair then goes through admission.
    let answer = timeout(
        SOON,
        a.handle
            .pair_request(b.peer, Some(b.addr.clone()), b"home code".to_vec()),
    )
    .await??;
    assert_eq!(answer, pairing_answer(b"home code"));
    wait_ready(&a, b.peer).await?;
    wait_ready(&b, a.peer).await?;
    let answer = timeout(
        SOON,
        a.handle.pair_request(b.peer, None, b"round 2".to_vec()),
    )
    .await??;
    assert_eq!(answer, pairing_answer(b"round 2"));
    let sent = timeout(SOON, a.handle.send(b.peer, Bytes::from("frame"))).await??;
    assert_eq!(sent, SendOutcome::Queued);
    assert_eq!(
        b_events.frames_from(a.peer, 1).await?,
        vec![b"frame".to_vec()]
    );
    a.stop().await?;
    b.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misuse_is_reported_without_touching_the_wire() -> Result<()> {
    init_tracing();
    let (issuer, mut issuer_events) = spawn_issuer(config(DeviceIdentity::generate())).await?;
    let joiner = Joiner::start()?;
    let pair = |peer, addr, bytes: Vec<u8>| {
        let handle = joiner.handle.clone();
        async move { timeout(SOON, handle.pair_request(peer, addr, bytes)).await }
    };

    let too_big = vec![0; MAX_PAIR_MESSAGE_SIZE + 1];
    assert!(matches!(
        pair(issuer.peer, Some(bare_addr(&issuer)), too_big.clone()).await?,
        Err(Error::FrameTooLarge { .. })
    ));
    assert!(matches!(
        pair(issuer.peer, None, b"x".to_vec()).await?,
        Err(Error::NotConnected { .. })
    ));
    let other = PeerId::random();
    let wrong = bare_addr(&issuer).with(Protocol::P2p(other));
    assert!(matches!(
        pair(issuer.peer, Some(wrong), b"x".to_vec()).await?,
        Err(Error::Dial { .. })
    ));
    // Nothing listens on a port just released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let closed: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse()?;
    assert!(matches!(
        pair(other, Some(closed), b"x".to_vec()).await?,
        Err(Error::Dial { .. })
    ));
    assert_eq!(issuer.handle.metrics().pair_requests_received, 0);

    // A maximal request goes through. The pump's answer to it would be three bytes over
    // the cap, so its `pair_respond` fails locally and the request stays open for the
    // proper answer sent here.
    let handle = joiner.handle.clone();
    let target = issuer.peer;
    let addr = bare_addr(&issuer);
    let asking = tokio::spawn(async move {
        let max = vec![7; MAX_PAIR_MESSAGE_SIZE];
        timeout(SOON, handle.pair_request(target, Some(addr), max)).await
    });
    let request_id = issuer_events
        .expect(SOON, "the maximal request", |e| match e {
            Event::PairRequest {
                request_id, bytes, ..
            } if bytes.len() == MAX_PAIR_MESSAGE_SIZE => Some(*request_id),
            _ => None,
        })
        .await?;
    assert!(matches!(
        issuer.handle.pair_respond(request_id, too_big).await,
        Err(Error::FrameTooLarge { .. })
    ));
    let full = vec![9; MAX_PAIR_MESSAGE_SIZE];
    assert!(issuer.handle.pair_respond(request_id, full.clone()).await?);
    assert_eq!(asking.await???, full, "a maximal answer arrives whole");
    assert!(
        !issuer
            .handle
            .pair_respond(request_id, b"twice".to_vec())
            .await?,
        "a request is answered once"
    );
    joiner.stop().await?;
    issuer.stop().await
}

/// Wire-compatible with the node's pairing request.
#[derive(Serialize)]
struct RawRequest {
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

/// Wire-compatible with the node's pairing response.
#[derive(Debug, Deserialize)]
enum RawResponse {
    Reply(#[serde(with = "serde_bytes")] Vec<u8>),
    Refused(String),
}

/// A bare libp2p peer that opens `/hearth/pair/1` streams by hand and writes whatever
/// it is given, bypassing every check in the node's own handle.
struct RawPeer {
    control: libp2p_stream::Control,
    target: PeerId,
    driver: JoinHandle<()>,
}

impl RawPeer {
    async fn connect(target: &TestNode) -> Result<Self> {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| libp2p_stream::Behaviour::new())?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build();
        let control = swarm.behaviour().new_control();
        swarm.dial(target.addr.clone())?;
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        let driver = tokio::spawn(async move {
            let mut up_tx = Some(up_tx);
            loop {
                if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await
                    && let Some(tx) = up_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        timeout(SOON, up_rx)
            .await
            .context("raw peer did not connect")??;
        Ok(Self {
            control,
            target: target.peer,
            driver,
        })
    }

    /// Sends `payload` as one request and returns whatever comes back before the node
    /// closes the stream (an error while writing or reading counts as being closed on).
    async fn exchange(&mut self, payload: &[u8]) -> Result<Vec<u8>> {
        let mut stream = timeout(SOON, self.control.open_stream(self.target, PAIR_PROTOCOL))
            .await?
            .map_err(|e| anyhow!("opening the pair stream: {e}"))?;
        let wrote = timeout(SOON, async {
            stream.write_all(payload).await?;
            stream.close().await
        })
        .await?;
        let mut answer = Vec::new();
        let read = timeout(SOON, stream.read_to_end(&mut answer)).await?;
        if wrote.is_err() || read.is_err() {
            return Ok(Vec::new());
        }
        Ok(answer)
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

fn encode(request: &RawRequest) -> Vec<u8> {
    let mut buf = Vec::new();
    ciborium::into_writer(request, &mut buf).expect("encoding to a Vec cannot fail");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_requests_leave_the_node_healthy() -> Result<()> {
    init_tracing();
    let (issuer, mut issuer_events) = spawn_issuer(config(DeviceIdentity::generate())).await?;
    let mut raw = RawPeer::connect(&issuer).await?;

    // The hand-rolled client speaks the protocol: a proper request is answered.
    let answer = raw
        .exchange(&encode(&RawRequest {
            bytes: b"well formed".to_vec(),
        }))
        .await?;
    let decoded: RawResponse = ciborium::from_reader(answer.as_slice())?;
    match decoded {
        RawResponse::Reply(bytes) => assert_eq!(bytes, pairing_answer(b"well formed")),
        RawResponse::Refused(reason) => bail!("refused: {reason}"),
    }

    // Not CBOR at all; far over the wire cap; valid CBOR whose payload is over the cap.
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let flood = vec![0x5a; 4 * MAX_PAIR_MESSAGE_SIZE];
    let fat = encode(&RawRequest {
        bytes: vec![1; MAX_PAIR_MESSAGE_SIZE + 1],
    });
    for (what, payload) in [("garbage", garbage), ("flood", flood), ("fat", fat)] {
        let answer = raw.exchange(&payload).await?;
        assert!(
            answer.is_empty(),
            "{what} got an answer: {} bytes",
            answer.len()
        );
    }
    eventually(SOON, "all three are counted as malformed", || async {
        Ok(issuer.handle.metrics().pair_requests_malformed == 3)
    })
    .await?;
    assert_eq!(
        issuer.handle.metrics().pair_requests_received,
        1,
        "nothing malformed reached the node"
    );
    issuer_events
        .refute(
            Duration::from_millis(200),
            "a malformed request surfaced",
            |e| matches!(e, Event::PairRequest { bytes, .. } if bytes != b"well formed"),
        )
        .await?;

    // The node still serves: the raw peer's connection and a fresh joiner both work.
    let answer = raw
        .exchange(&encode(&RawRequest {
            bytes: b"still there".to_vec(),
        }))
        .await?;
    assert!(!answer.is_empty(), "the raw peer is still served");
    let joiner = Joiner::start()?;
    assert_eq!(
        joiner
            .pair(issuer.peer, Some(bare_addr(&issuer)), b"hello")
            .await?,
        pairing_answer(b"hello")
    );
    joiner.stop().await?;
    drop(raw);
    issuer.stop().await
}
