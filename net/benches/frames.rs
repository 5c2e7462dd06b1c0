//! Round trip of one frame over the long-lived `/hearth/sync/1` stream on loopback:
//! A sends, B's node layer echoes it back, A receives it. Criterion reports the mean;
//! the p50/p95 of every individual round trip are printed at the end of each group.
//!
//! Run with `cargo bench -p hearth-net --bench frames`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use hearth_net::{
    Bytes, Config, DeviceIdentity, Event, EventStream, Handle, PeerClass, PeerId, Protocol,
};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Payload sizes measured: a typical small change push, and a larger batch.
const SIZES: [usize; 2] = [200, 16 * 1024];

fn node_config() -> Config {
    Config {
        identity: DeviceIdentity::generate(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
        mdns: false,
        dial_discovered: false,
        ..Config::default()
    }
}

/// Two connected, admitted nodes; B echoes every sync frame back to its sender.
struct Pair {
    a: Handle,
    /// Taken out for each measurement batch so no lock is held across an await.
    a_events: Mutex<Option<EventStream>>,
    b_peer: PeerId,
    cancel: CancellationToken,
}

async fn pair() -> Pair {
    let cancel = CancellationToken::new();
    let (a, mut a_events, a_loop) = hearth_net::new(node_config()).expect("node A");
    let (b, mut b_events, b_loop) = hearth_net::new(node_config()).expect("node B");
    tokio::spawn(a_loop.run(cancel.clone()));
    tokio::spawn(b_loop.run(cancel.clone()));
    let b_peer = b.local_peer_id();
    let b_addr = loop {
        if let Some(addr) = b
            .listen_addrs()
            .await
            .expect("B running")
            .into_iter()
            .next()
        {
            break addr.with(Protocol::P2p(b_peer));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let echo = b.clone();
    tokio::spawn(async move {
        while let Some(event) = b_events.recv().await {
            match event {
                Event::Hello { peer, .. } => {
                    let _ = echo.admit(peer, PeerClass::Own).await;
                }
                Event::Frame { peer, bytes, .. } => {
                    let _ = echo.send(peer, bytes).await;
                }
                _ => {}
            }
        }
    });
    a.add_static_peer(b_addr).await.expect("static peer");
    // Admit B at A, then wait for a first echo to know the stream is up both ways.
    loop {
        match a_events.recv().await.expect("A running") {
            Event::Hello { peer, .. } if peer == b_peer => {
                a.admit(peer, PeerClass::Own).await.expect("admit");
                break;
            }
            _ => {}
        }
    }
    let probe = Bytes::from_static(b"warm-up");
    let _ = a.send(b_peer, probe).await.expect("send");
    loop {
        if let Some(Event::Frame { .. }) = a_events.recv().await {
            break;
        }
    }
    Pair {
        a,
        a_events: Mutex::new(Some(a_events)),
        b_peer,
        cancel,
    }
}

async fn round_trip(pair: &Pair, events: &mut EventStream, payload: &Bytes) -> Duration {
    let start = Instant::now();
    let _ = pair
        .a
        .send(pair.b_peer, payload.clone())
        .await
        .expect("send");
    loop {
        match events.recv().await {
            Some(Event::Frame { bytes, .. }) if bytes.len() == payload.len() => {
                return start.elapsed();
            }
            Some(_) => continue,
            None => panic!("A's event stream ended"),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn frames(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let pair = rt.block_on(pair());
    let mut group = c.benchmark_group("sync_frame_round_trip");
    for size in SIZES {
        let payload = Bytes::from(vec![0xa5; size]);
        let samples = Mutex::new(Vec::new());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, payload| {
            b.iter_custom(|iters| run(&rt, &pair, payload, iters, &samples));
        });
        let mut all = samples.into_inner().expect("samples lock");
        all.sort();
        if !all.is_empty() {
            println!(
                "sync_frame_round_trip/{size}: {} samples, p50 {:?}, p95 {:?}, p99 {:?}",
                all.len(),
                percentile(&all, 0.50),
                percentile(&all, 0.95),
                percentile(&all, 0.99),
            );
        }
    }
    group.finish();
    pair.cancel.cancel();
}

fn run(
    rt: &Runtime,
    pair: &Pair,
    payload: &Bytes,
    iters: u64,
    samples: &Mutex<Vec<Duration>>,
) -> Duration {
    rt.block_on(async {
        let mut events = pair
            .a_events
            .lock()
            .expect("events lock")
            .take()
            .expect("one batch at a time");
        let mut total = Duration::ZERO;
        let mut local = Vec::with_capacity(iters as usize);
        for _ in 0..iters {
            let rtt = round_trip(pair, &mut events, payload).await;
            total += rtt;
            local.push(rtt);
        }
        samples.lock().expect("samples lock").extend(local);
        *pair.a_events.lock().expect("events lock") = Some(events);
        total
    })
}

// A hand-written main instead of criterion_group!/criterion_main!, whose generated
// functions carry no docs and would trip the workspace's missing_docs lint.
fn main() {
    let mut criterion = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    frames(&mut criterion);
    criterion.final_summary();
}
