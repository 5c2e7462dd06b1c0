//! Cold start and memory: a store with D documents is written by a node in this process,
//! then opened by a child process (this binary with a hidden flag), so the time to serve
//! reads and the RSS are that node's alone.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::Sizes;
use super::cluster::{self, Device, NodeHeads, Scratch};
use super::report::{Figure, ScenarioReport};

/// What the child reports on stdout, as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Opened {
    /// From the child's start to `Node::start` returning.
    start_ms: f64,
    /// From the child's start to the first read answered.
    serve_ms: f64,
    rss_serve: u64,
    rss_rest: u64,
    heads: String,
}

/// The child: opens the node in `dir`, reads one entity, rests, and reports.
pub(crate) async fn open(dir: &Path, rest: Duration) -> Result<()> {
    let started = Instant::now();
    let node = hearth::Node::start(cluster::config(dir, "coldstart", Duration::ZERO)).await?;
    let start_ms = started.elapsed().as_secs_f64() * 1e3;
    // `sensor.b0` exists when the store holds any document; either answer is a read.
    node.entities().get("sensor.b0").await?;
    let serve_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_serve = cluster::rss_bytes().unwrap_or(0);
    tokio::time::sleep(rest).await;
    let rss_rest = cluster::rss_bytes().unwrap_or(0);
    let heads = node.sync_counters().await?.heads_root;
    node.shutdown().await?;
    let opened = Opened {
        start_ms,
        serve_ms,
        rss_serve,
        rss_rest,
        heads,
    };
    let mut out = std::io::stdout();
    writeln!(out, "{}", serde_json::to_string(&opened)?)?;
    Ok(())
}

/// One store and what the child saw opening it.
pub(crate) struct StoreRun {
    docs: usize,
    written: NodeHeads,
    opened: Opened,
}

/// Writes a store of each size (and an empty one as the baseline) and opens each in a
/// child process.
pub(crate) async fn measure_stores(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<StoreRun>> {
    let mut runs = Vec::new();
    let mut docs = vec![0];
    docs.extend(sizes.store_docs.iter().copied().filter(|d| *d > 0));
    for d in docs {
        let device = Device::first(scratch, "writer", Duration::from_millis(1)).await?;
        cluster::populate(&device, d, "0").await?;
        let heads = device.heads().await?;
        let (name, dir) = device.stop().await?;
        let opened = spawn_child(&dir, sizes.rest)
            .await
            .with_context(|| format!("opening a store of {d} documents in a child process"))?;
        scratch.discard(&dir);
        runs.push(StoreRun {
            docs: d,
            written: NodeHeads { node: name, heads },
            opened,
        });
    }
    Ok(runs)
}

async fn spawn_child(dir: &Path, rest: Duration) -> Result<Opened> {
    let exe = std::env::current_exe().context("cannot find this program to run it again")?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("bench")
        .arg("--child-open")
        .arg(dir)
        .arg("--child-rest-ms")
        .arg(rest.as_millis().to_string())
        .stdin(std::process::Stdio::null());
    // The child bounds its own run: every wait in it has a limit.
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    if !output.status.success() {
        bail!(
            "the child failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim()).context("the child's report is not JSON")
}

fn nodes(run: &StoreRun) -> Vec<NodeHeads> {
    vec![
        run.written.clone(),
        NodeHeads {
            node: "reopened".into(),
            heads: run.opened.heads.clone(),
        },
    ]
}

/// Time to serve reads and RSS after opening a store of D documents; the baseline is
/// the same for an empty store.
pub(crate) fn coldstart_report(runs: &[StoreRun]) -> Vec<ScenarioReport> {
    let Some(empty) = runs.iter().find(|r| r.docs == 0) else {
        return Vec::new();
    };
    // The time must not grow with D: the largest store within 2x of a tenth its size.
    let tenth = |d: usize| {
        runs.iter()
            .find(|r| r.docs * 10 == d)
            .map(|r| r.opened.serve_ms)
    };
    runs.iter()
        .filter(|r| r.docs > 0)
        .map(|r| {
            let serve = Figure::new("time to serve reads", r.opened.serve_ms, "ms")
                .baseline("empty store", empty.opened.serve_ms);
            let serve = match (r.docs >= 10_000, tenth(r.docs)) {
                (true, Some(small)) => serve.target(
                    format!("<= 300 ms, <= 2x D={} ({small:.0} ms)", r.docs / 10),
                    r.opened.serve_ms <= 300.0 && r.opened.serve_ms <= 2.0 * small,
                ),
                (true, None) => serve.target("<= 300 ms", r.opened.serve_ms <= 300.0),
                _ => serve,
            };
            ScenarioReport::new("coldstart", format!("D={}", r.docs), nodes(r))
                .figure(serve)
                .figure(
                    Figure::new("node started", r.opened.start_ms, "ms")
                        .baseline("empty store", empty.opened.start_ms),
                )
                .figure(
                    Figure::new("RSS when serving", mib(r.opened.rss_serve), "MiB")
                        .baseline("empty store", mib(empty.opened.rss_serve)),
                )
        })
        .collect()
}

/// RSS at rest and bytes per document; the baseline is an empty store's node.
pub(crate) fn memory_report(runs: &[StoreRun]) -> Vec<ScenarioReport> {
    let Some(empty) = runs.iter().find(|r| r.docs == 0) else {
        return Vec::new();
    };
    runs.iter()
        .filter(|r| r.docs > 0)
        .map(|r| {
            let per_doc =
                r.opened.rss_rest.saturating_sub(empty.opened.rss_rest) as f64 / r.docs as f64;
            let rest = Figure::new("RSS at rest", mib(r.opened.rss_rest), "MiB")
                .baseline("empty store", mib(empty.opened.rss_rest));
            let rest = if r.docs >= 10_000 {
                rest.target("<= 64 MiB", mib(r.opened.rss_rest) <= 64.0)
            } else {
                rest
            };
            ScenarioReport::new("memory", format!("D={}", r.docs), nodes(r))
                .figure(rest)
                .figure(Figure::new("RSS per document", per_doc, "B"))
        })
        .collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
