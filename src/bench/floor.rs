//! In-run baselines: the parts of the hot path's physical floor (a raw TCP echo round trip
//! over loopback, and a bare Automerge put-and-apply), measured in the same run as the
//! figures they are compared with, because absolute times on shared machines are noise.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT, ReadDoc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Size of each echoed message: about one sealed single-field push.
pub(crate) const ECHO_BYTES: usize = 200;

async fn echo_pair() -> Result<(TcpStream, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let _ = socket.set_nodelay(true);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if socket.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let client = TcpStream::connect(addr).await?;
    client.set_nodelay(true)?;
    Ok((client, server))
}

/// `count` sequential round trips of one message each; each sample is one round trip.
pub(crate) async fn tcp_echo(count: usize) -> Result<Vec<Duration>> {
    let (mut client, server) = echo_pair().await?;
    let message = [7u8; ECHO_BYTES];
    let mut back = [0u8; ECHO_BYTES];
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        client.write_all(&message).await?;
        client
            .read_exact(&mut back)
            .await
            .context("echo server went away")?;
        samples.push(started.elapsed());
    }
    drop(client);
    let _ = server.await;
    Ok(samples)
}

/// `count` messages echoed with the writer running ahead of the reader: messages per
/// second, the raw transport's throughput.
pub(crate) async fn tcp_echo_throughput(count: usize) -> Result<f64> {
    let (client, server) = echo_pair().await?;
    let (mut read, mut write) = client.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let message = [7u8; ECHO_BYTES];
        for _ in 0..count {
            write.write_all(&message).await?;
        }
        Ok::<_, std::io::Error>(write)
    });
    let mut buf = vec![0u8; ECHO_BYTES * 64];
    let mut left = count * ECHO_BYTES;
    while left > 0 {
        let n = read.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "echo server went away");
        left = left.saturating_sub(n);
    }
    let took = started.elapsed();
    drop(writer.await??);
    drop(read);
    let _ = server.await;
    Ok(count as f64 / took.as_secs_f64())
}

/// `count` single puts on one document, each committed, saved incrementally and loaded
/// into a second document: the CRDT's share of the floor, with no I/O.
pub(crate) fn automerge_put_apply(count: usize) -> Result<Vec<Duration>> {
    let mut a = AutoCommit::new();
    a.put(ROOT, "state", "init")?;
    a.commit();
    let mut b = AutoCommit::load(&a.save())?;
    let _ = a.save_incremental();
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        a.put(ROOT, "state", format!("v{i}"))?;
        a.commit();
        let bytes = a.save_incremental();
        b.load_incremental(&bytes)?;
        samples.push(started.elapsed());
    }
    anyhow::ensure!(
        b.get(ROOT, "state")?.is_some(),
        "the applied document lost its field"
    );
    Ok(samples)
}

/// Encoded size of one bare Automerge change that sets one string field.
pub(crate) fn single_field_change_bytes() -> Result<usize> {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "state", "off")?;
    doc.commit();
    let _ = doc.save_incremental();
    doc.put(ROOT, "state", "on")?;
    doc.commit();
    Ok(doc.save_incremental().len())
}

/// Encoded size of `count` bare Automerge changes, each appending one chat message
/// (text, user, time) to a list.
pub(crate) fn chat_burst_change_bytes(count: usize, text: &str) -> Result<usize> {
    let mut doc = AutoCommit::new();
    let list = doc.put_object(ROOT, "messages", ObjType::List)?;
    doc.commit();
    let _ = doc.save_incremental();
    let mut total = 0;
    for i in 0..count {
        let m = doc.insert_object(&list, i, ObjType::Map)?;
        doc.put(&m, "text", format!("{text} {i}"))?;
        doc.put(&m, "user", "bench")?;
        doc.put(&m, "at", 1_700_000_000_000i64 + i as i64)?;
        doc.commit();
        total += doc.save_incremental().len();
    }
    Ok(total)
}

/// The `p`th percentile (0..=1) of the samples, in microseconds.
pub(crate) fn percentile_us(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let at = ((samples.len() as f64 * p) as usize).min(samples.len() - 1);
    samples[at].as_secs_f64() * 1e6
}

/// p50, p95 and p99 in microseconds.
pub(crate) fn p50_95_99(samples: &mut [Duration]) -> (f64, f64, f64) {
    (
        percentile_us(samples, 0.50),
        percentile_us(samples, 0.95),
        percentile_us(samples, 0.99),
    )
}
