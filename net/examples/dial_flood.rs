//! Dials a node again and again, each time as a fresh peer: a new Ed25519 identity, a TCP
//! connection from one of the given source addresses, multistream-select, the whole Noise
//! handshake and yamux. Each connection then sits for HOLD_MS, accepting and dropping
//! whatever streams the node opens (it never says hello), and closes. What it spends on the
//! node is an authenticated connection from a stranger: the per-IP and unknown-peer caps
//! must bound those, and the home's own devices must keep their slots.
//!
//! Used by the reliability suite's flood scenario (tests/reliability/flood.py), from a
//! namespace the suite made.
//!
//! Usage: dial_flood TARGET_IP PORT SECONDS DIALS_PER_MIN HOLD_MS SOURCE_IP...
//! Prints its counts as one JSON line when done.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::poll_fn;
use libp2p::core::muxing::StreamMuxerExt;
use libp2p::core::upgrade::{OutboundConnectionUpgrade, UpgradeInfo, Version};
use libp2p::{identity, noise, yamux};

/// Longest a dial may take to finish its handshakes before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Counts {
    dials: AtomicU64,
    /// Noise and yamux completed: the node knows this dial's fresh PeerId.
    authenticated: AtomicU64,
    /// The node closed the connection before HOLD_MS was up.
    closed_by_node: AtomicU64,
    /// TCP refused or reset, or a handshake failed or timed out.
    failed: AtomicU64,
    handshake_micros: AtomicU64,
}

fn usage() -> ! {
    eprintln!("usage: dial_flood TARGET_IP PORT SECONDS DIALS_PER_MIN HOLD_MS SOURCE_IP...");
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 7 {
        usage();
    }
    let target = SocketAddr::new(arg::<IpAddr>(&args, 1), arg(&args, 2));
    let seconds: f64 = arg(&args, 3);
    let per_min: f64 = arg(&args, 4);
    let hold = Duration::from_millis(arg(&args, 5));
    let sources: Vec<IpAddr> = (6..args.len()).map(|i| arg(&args, i)).collect();
    if per_min <= 0.0 || seconds <= 0.0 {
        usage();
    }

    let counts = Arc::new(Counts::default());
    let interval = Duration::from_secs_f64(60.0 / per_min);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut next = start;
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0usize;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let source = sources[n % sources.len()];
        n += 1;
        counts.dials.fetch_add(1, Ordering::Relaxed);
        let counts = counts.clone();
        tasks.spawn(async move {
            let begun = Instant::now();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(source, target)).await {
                Ok(Ok(muxer)) => {
                    counts.authenticated.fetch_add(1, Ordering::Relaxed);
                    counts
                        .handshake_micros
                        .fetch_add(begun.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if hold_open(muxer, hold).await {
                        counts.closed_by_node.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // Reap finished dials as we go, so the set stays as small as the dials in flight.
        while tasks.try_join_next().is_some() {}
        next += interval;
    }
    while tasks.join_next().await.is_some() {}

    let authenticated = counts.authenticated.load(Ordering::Relaxed);
    let mean_ms = if authenticated == 0 {
        0.0
    } else {
        counts.handshake_micros.load(Ordering::Relaxed) as f64 / authenticated as f64 / 1000.0
    };
    println!(
        "{{\"dials\": {}, \"authenticated\": {}, \"closed_by_node\": {}, \"failed\": {}, \
         \"handshake_mean_ms\": {:.2}, \"seconds\": {:.1}, \"sources\": {}}}",
        counts.dials.load(Ordering::Relaxed),
        authenticated,
        counts.closed_by_node.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        mean_ms,
        start.elapsed().as_secs_f64(),
        sources.len(),
    );
}

type Muxer = yamux::Muxer<
    libp2p::core::Negotiated<
        noise::Output<libp2p::core::Negotiated<libp2p::tcp::tokio::TcpStream>>,
    >,
>;

/// TCP from `source`, then the same upgrades a libp2p dialer makes: Noise under a fresh
/// identity, then yamux, each chosen with multistream-select.
async fn handshake(
    source: IpAddr,
    target: SocketAddr,
) -> Result<Muxer, Box<dyn std::error::Error + Send + Sync>> {
    let socket = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = libp2p::tcp::tokio::TcpStream(socket.connect(target).await?);

    let identity = identity::Keypair::generate_ed25519();
    let noise = noise::Config::new(&identity)?;
    let protocols: Vec<_> = noise.protocol_info().collect();
    let (protocol, io) =
        multistream_select::dialer_select_proto(tcp, protocols, Version::V1).await?;
    let (_remote, secured) = noise.upgrade_outbound(io, protocol).await?;

    let yamux = yamux::Config::default();
    let protocols: Vec<_> = yamux.protocol_info().collect();
    let (protocol, io) =
        multistream_select::dialer_select_proto(secured, protocols, Version::V1).await?;
    Ok(yamux.upgrade_outbound(io, protocol).await?)
}

/// Keeps the connection for `hold`, dropping every stream the node opens. True when the
/// node closed it first.
async fn hold_open(mut muxer: Muxer, hold: Duration) -> bool {
    let closed = async {
        poll_fn(|cx| {
            loop {
                match muxer.poll_inbound_unpin(cx) {
                    Poll::Ready(Ok(stream)) => drop(stream),
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => break,
                }
            }
            match muxer.poll_unpin(cx) {
                Poll::Ready(Err(_)) => Poll::Ready(()),
                Poll::Ready(Ok(_)) | Poll::Pending => Poll::Pending,
            }
        })
        .await
    };
    let closed_first = tokio::time::timeout(hold, closed).await.is_ok();
    // A node that stopped reading must not keep this dial, and the counts, from finishing.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        poll_fn(|cx| muxer.poll_close_unpin(cx)),
    )
    .await;
    closed_first
}
