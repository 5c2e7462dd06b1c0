//! The `api` scenario: real HTTP clients (keep-alive, one connection each) writing
//! entities with `PUT /api/entities/{id}` against device A's API while device B
//! replicates. A write counts once the API acknowledged it (200 with the entity).
//!
//! The baseline is the same clients against an HTTP server in this process that answers
//! every request at once without doing anything: what the clients and the HTTP stack
//! cost on this machine. The clients share the cores with the node, so their CPU is
//! measured apart (each client thread's own run time) and the node's is the rest of the
//! process's.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use super::Sizes;
use super::cluster::{Scratch, converge};
use super::floor::p50_95_99;
use super::report::{Figure, ScenarioReport};
use super::ws::serve;

/// The goal, acknowledged updates a second with 64 clients.
const TARGET_RATE: f64 = 5000.0;

/// What the clients did.
struct Load {
    acknowledged: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time of the client threads, summed.
    client_cpu: Duration,
    /// CPU time of this whole process over the same span.
    process_cpu: Duration,
}

/// Runs the `api` scenario.
pub(crate) async fn api(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<ScenarioReport>> {
    let clients = sizes.api_clients.max(1);
    let updates = sizes.api_updates.max(clients);
    let entities = sizes.entities.max(clients);

    // The baseline: the same clients against a server that does nothing.
    let (floor_addr, floor_server) = floor_server().await?;
    let floor = drive(
        floor_addr.to_string(),
        String::new(),
        clients,
        updates,
        entities,
    )
    .await
    .context("the HTTP floor")?;
    floor_server.abort();

    let a = serve(scratch, None, "api-a").await?;
    let b = serve(scratch, Some(&a), "api-b").await?;
    // Every entity exists before the timed run, so each timed write is an update.
    let created = drive(a.api.clone(), a.token.clone(), clients, entities, entities).await?;
    ensure!(
        created.acknowledged == entities,
        "only {} of {entities} entities were created",
        created.acknowledged
    );
    converge(&[&a.device, &b.device]).await?;
    let load = drive(a.api.clone(), a.token.clone(), clients, updates, entities).await?;
    let nodes = converge(&[&a.device, &b.device]).await?;

    let mut report = ScenarioReport::new(
        "api",
        format!("{clients} HTTP clients, {updates} PUTs over {entities} entities, two devices"),
        nodes,
    );
    let rate = per_second(load.acknowledged, load.elapsed);
    let floor_rate = per_second(floor.acknowledged, floor.elapsed);
    let mut lat = load.latencies;
    let mut floor_lat = floor.latencies;
    let (p50, p95, p99) = p50_95_99(&mut lat);
    let (_, floor_p95, _) = p50_95_99(&mut floor_lat);
    let node_cpu = load.process_cpu.saturating_sub(load.client_cpu);
    report = report
        .figure(
            Figure::new("acknowledged updates", rate, "/s")
                .baseline("same clients, HTTP server doing nothing", floor_rate)
                .target(format!(">= {TARGET_RATE:.0}/s"), rate >= TARGET_RATE),
        )
        .figure(Figure::new("PUT p50", p50, "us"))
        .figure(
            Figure::new("PUT p95", p95, "us")
                .baseline("same clients, HTTP server doing nothing", floor_p95),
        )
        .figure(Figure::new("PUT p99", p99, "us"))
        .figure(Figure::new(
            "clients' CPU",
            load.client_cpu.as_secs_f64(),
            "s",
        ))
        .figure(Figure::new(
            "node CPU (both devices)",
            node_cpu.as_secs_f64(),
            "s",
        ))
        .figure(Figure::new(
            "node CPU per update",
            node_cpu.as_secs_f64() * 1e6 / load.acknowledged.max(1) as f64,
            "us",
        ))
        .figure(Figure::new(
            "clients' CPU per update, HTTP floor",
            floor.client_cpu.as_secs_f64() * 1e6 / floor.acknowledged.max(1) as f64,
            "us",
        ));
    for s in [b, a] {
        let (_, dir) = s.device.stop().await?;
        scratch.discard(&dir);
    }
    Ok(vec![report])
}

fn per_second(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// An HTTP server on loopback that reads every request's body and answers it with a
/// small JSON body. The body is read as the node reads it: a server that answers before
/// reading it closes the connection after the answer, and the client's next request on
/// that kept-alive connection fails.
async fn floor_server() -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|body: axum::body::Bytes| async move {
        axum::Json(json!({"entity_id": "bench.floor", "state": "on", "read": body.len()}))
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

/// `clients` threads, each with its own keep-alive connection, send `updates` PUTs in all
/// (entity `i % entities` for the `i`th), one at a time each. Any answer but 200 fails
/// the run.
async fn drive(
    api: String,
    token: String,
    clients: usize,
    updates: usize,
    entities: usize,
) -> Result<Load> {
    tokio::task::spawn_blocking(move || drive_blocking(&api, &token, clients, updates, entities))
        .await?
}

fn drive_blocking(
    api: &str,
    token: &str,
    clients: usize,
    updates: usize,
    entities: usize,
) -> Result<Load> {
    let start = std::sync::Barrier::new(clients + 1);
    type Done = Result<(usize, Vec<Duration>, Duration)>;
    let (results, process_before, started) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let start = &start;
                scope.spawn(move || -> Result<(usize, Vec<Duration>, Duration)> {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .timeout_global(Some(Duration::from_secs(30)))
                        .http_status_as_error(false)
                        .build()
                        .into();
                    let mine: Vec<usize> = (c..updates).step_by(clients).collect();
                    let mut latencies = Vec::with_capacity(mine.len());
                    start.wait();
                    let cpu_before = thread_cpu();
                    for i in &mine {
                        let url = format!("http://{api}/api/entities/bench.api_{}", i % entities);
                        let body = json!({ "state": format!("s{i}") });
                        let sent = Instant::now();
                        let mut r = agent
                            .put(&url)
                            .header("Authorization", &format!("Bearer {token}"))
                            .send_json(&body)
                            .with_context(|| format!("PUT {url}"))?;
                        // Read the whole answer, as a client would, before the next.
                        let text = r.body_mut().read_to_string()?;
                        if r.status() != 200 {
                            bail!("PUT {url} answered {}: {text}", r.status());
                        }
                        latencies.push(sent.elapsed());
                    }
                    let cpu = thread_cpu().saturating_sub(cpu_before);
                    Ok((mine.len(), latencies, cpu))
                })
            })
            .collect();
        let process_before = process_cpu();
        let started = Instant::now();
        start.wait();
        let results: Vec<Done> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect();
        (results, process_before, started)
    });
    let elapsed = started.elapsed();
    let process_cpu = process_cpu().saturating_sub(process_before);
    let mut load = Load {
        acknowledged: 0,
        elapsed,
        latencies: Vec::with_capacity(updates),
        client_cpu: Duration::ZERO,
        process_cpu,
    };
    for r in results {
        let (n, lat, cpu) = r?;
        load.acknowledged += n;
        load.latencies.extend(lat);
        load.client_cpu += cpu;
    }
    Ok(load)
}

/// CPU time of the calling thread (Linux's schedstat, in ns); zero elsewhere.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time of this process, user and system (Linux's `/proc/self/stat`, in clock ticks
/// of 1/100 s); zero elsewhere.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; those after the name start at 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_readings_move_forward_with_work() {
        let (t0, p0) = (thread_cpu(), process_cpu());
        let mut x = 0u64;
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(thread_cpu() > t0, "the thread's CPU time did not move");
        assert!(process_cpu() >= p0);
    }
}
