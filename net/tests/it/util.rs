//! Helpers shared by the integration tests: spawning nodes on loopback with mDNS off and
//! waiting for events, every wait bounded by a timeout.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hearth_net::{
    Config, DeviceIdentity, Event, EventStream, Handle, Multiaddr, PeerClass, PeerId, Protocol,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// Generous bound for anything that should happen "soon" on loopback.
pub(crate) const SOON: Duration = Duration::from_secs(10);

/// Capacity of the channel a test node's event pump forwards into.
const TEST_EVENT_CAPACITY: usize = 65_536;

/// Installs a log subscriber once, honouring RUST_LOG.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A config for tests: loopback, ephemeral port, no mDNS (never on the root namespace).
pub(crate) fn config(identity: DeviceIdentity) -> Config {
    let certificate = format!("cert-of-{}", identity.peer_id()).into_bytes();
    Config {
        identity,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        dial_discovered: false,
        certificate,
        ..Config::default()
    }
}

/// Two identities, the first with the smaller PeerId.
pub(crate) fn ordered_identities() -> (DeviceIdentity, DeviceIdentity) {
    let a = DeviceIdentity::generate();
    let b = DeviceIdentity::generate();
    if a.peer_id_bytes() < b.peer_id_bytes() {
        (a, b)
    } else {
        (b, a)
    }
}

/// A running node: its handle, the dialable address, and what it takes to stop it.
pub(crate) struct TestNode {
    pub(crate) handle: Handle,
    pub(crate) peer: PeerId,
    /// `/ip4/127.0.0.1/tcp/N/p2p/<peer>`.
    pub(crate) addr: Multiaddr,
    cancel: CancellationToken,
    join: JoinHandle<()>,
}

impl TestNode {
    /// Stops the event loop and waits until it has released its sockets.
    pub(crate) async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        timeout(SOON, self.join)
            .await
            .context("event loop did not stop")??;
        Ok(())
    }

    /// The listening TCP port.
    pub(crate) fn port(&self) -> u16 {
        self.addr
            .iter()
            .find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .expect("test nodes listen on tcp")
    }

    /// This node's view of `peer`, if connected.
    pub(crate) async fn info(&self, peer: PeerId) -> Result<Option<hearth_net::PeerInfo>> {
        let peers = timeout(SOON, self.handle.connected_peers()).await??;
        Ok(peers.into_iter().find(|p| p.peer == peer))
    }
}

/// Starts a node and hands back its raw event stream (nobody reads it unless the test does).
pub(crate) async fn spawn_manual(config: Config) -> Result<(TestNode, EventStream)> {
    let (handle, events, event_loop) = hearth_net::new(config)?;
    let cancel = CancellationToken::new();
    let join = tokio::spawn(event_loop.run(cancel.clone()));
    let peer = handle.local_peer_id();
    let deadline = Instant::now() + SOON;
    let listen = loop {
        let addrs = timeout(SOON, handle.listen_addrs()).await??;
        if let Some(addr) = addrs.into_iter().next() {
            break addr;
        }
        if Instant::now() > deadline {
            bail!("node never reported a listen address");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let addr = listen.with(Protocol::P2p(peer));
    Ok((
        TestNode {
            handle,
            peer,
            addr,
            cancel,
            join,
        },
        events,
    ))
}

/// Events a node's pump forwarded, with helpers to wait for the interesting ones.
pub(crate) struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// Waits for the first event matching `pred`, skipping others.
    pub(crate) async fn expect<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut pred: impl FnMut(&Event) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = timeout(left, self.rx.recv())
                .await
                .map_err(|_| anyhow!("timed out after {within:?} waiting for {what}"))?
                .ok_or_else(|| anyhow!("event stream ended while waiting for {what}"))?;
            if let Some(found) = pred(&event) {
                return Ok(found);
            }
        }
    }

    /// Collects events for `during`, failing at once if one matches `forbidden`.
    pub(crate) async fn refute(
        &mut self,
        during: Duration,
        what: &str,
        mut forbidden: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>> {
        let deadline = Instant::now() + during;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.rx.recv()).await {
                Err(_) => return Ok(seen),
                Ok(None) => return Ok(seen),
                Ok(Some(event)) => {
                    if forbidden(&event) {
                        bail!("{what}: {event:?}");
                    }
                    seen.push(event);
                }
            }
        }
    }

    /// Waits for `count` sync frames from `from`, returning their payloads in order.
    pub(crate) async fn frames_from(&mut self, from: PeerId, count: usize) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let bytes = self
                .expect(SOON, "a sync frame", |e| match e {
                    Event::Frame { peer, bytes, .. } if *peer == from => Some(bytes.to_vec()),
                    _ => None,
                })
                .await?;
            out.push(bytes);
        }
        Ok(out)
    }
}

/// Starts a node whose events are pumped by a task that admits every peer on its hello.
pub(crate) async fn spawn_auto(config: Config) -> Result<(TestNode, Events)> {
    spawn_with_policy(config, |_| true).await
}

/// Starts a node that admits peers for which `admit` returns true and never answers the
/// others (they hit the hello timeout).
pub(crate) async fn spawn_with_policy(
    config: Config,
    admit: impl Fn(&PeerId) -> bool + Send + 'static,
) -> Result<(TestNode, Events)> {
    spawn_pump(config, admit, false).await
}

/// The reply [`spawn_pairing`] nodes send to a pairing message.
pub(crate) fn pairing_answer(request: &[u8]) -> Vec<u8> {
    [b"re:".as_slice(), request].concat()
}

/// Like [`spawn_with_policy`], and every pairing request is answered at once with
/// [`pairing_answer`] of its bytes (the event is still forwarded).
pub(crate) async fn spawn_pairing(
    config: Config,
    admit: impl Fn(&PeerId) -> bool + Send + 'static,
) -> Result<(TestNode, Events)> {
    spawn_pump(config, admit, true).await
}

async fn spawn_pump(
    config: Config,
    admit: impl Fn(&PeerId) -> bool + Send + 'static,
    answer_pairing: bool,
) -> Result<(TestNode, Events)> {
    let (node, mut stream) = spawn_manual(config).await?;
    let (tx, rx) = mpsc::channel(TEST_EVENT_CAPACITY);
    let handle = node.handle.clone();
    tokio::spawn(async move {
        while let Some(event) = stream.recv().await {
            if let Event::Hello { peer, .. } = &event
                && admit(peer)
            {
                // The peer may be gone already; that is not the pump's business.
                let _ = handle.admit(*peer, PeerClass::Own).await;
            }
            if let Event::PairRequest {
                request_id, bytes, ..
            } = &event
                && answer_pairing
            {
                let _ = handle
                    .pair_respond(*request_id, pairing_answer(bytes))
                    .await;
            }
            if tx.send(event).await.is_err() {
                break;
            }
        }
    });
    Ok((node, Events { rx }))
}

/// Polls `check` until it returns true or `within` passes.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if timeout(left, check()).await.unwrap_or(Ok(false))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` sees `peer` admitted with its sync stream up.
pub(crate) async fn wait_ready(node: &TestNode, peer: PeerId) -> Result<()> {
    eventually(SOON, "the sync stream is up", || async {
        Ok(node
            .info(peer)
            .await?
            .is_some_and(|i| i.admitted && i.sync_stream_open))
    })
    .await
}
