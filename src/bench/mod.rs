//! `hearth bench`: measures the sync path on this machine against in-run baselines.
//!
//! Latency and throughput run every node in this process on loopback (mDNS off,
//! encryption on, as in production). Cold start and memory open a store in a child process
//! (this binary again, with a hidden flag) so each figure is that node's own. Every
//! scenario ends by reading each node's heads root, and the report shows them, so
//! convergence is shown rather than claimed.

mod api;
mod child;
mod cluster;
mod floor;
mod report;
mod scenarios;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

pub(crate) use report::Report;
use report::ScenarioReport;

/// Flags of `hearth bench`. Sizes left unset take the defaults of the scenarios,
/// or small ones with --quick.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Small sizes for a smoke run (CI): every scenario, in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SCENARIO")]
    only: Vec<Scenario>,
    /// latency: sequential updates (default 2000).
    #[arg(long, value_name = "N")]
    updates: Option<usize>,
    /// throughput: updates in all (default 20000).
    #[arg(long, value_name = "N")]
    throughput_updates: Option<usize>,
    /// throughput and batching: entities the updates spread over (default 100).
    #[arg(long, value_name = "N")]
    entities: Option<usize>,
    /// throughput: writes per `set_many` call (default 1000).
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// fanout: reader counts (default 1,3,5,9).
    #[arg(long, value_delimiter = ',', value_name = "R,..")]
    readers: Option<Vec<usize>>,
    /// fanout: sequential updates per reader count (default 500).
    #[arg(long, value_name = "N")]
    fanout_updates: Option<usize>,
    /// reconnect: documents held by both devices (default 100,1000,10000).
    #[arg(long, value_delimiter = ',', value_name = "D,..")]
    reconnect_docs: Option<Vec<usize>>,
    /// coldstart and memory: documents in the store (default 1000,10000).
    #[arg(long, value_delimiter = ',', value_name = "D,..")]
    store_docs: Option<Vec<usize>>,
    /// history: changes written to the entity before it is measured (default 100000).
    #[arg(long, value_name = "N")]
    history_changes: Option<usize>,
    /// batching: windows to compare, in ms (default 0,1,5).
    #[arg(long, value_delimiter = ',', value_name = "MS,..")]
    windows: Option<Vec<u64>>,
    /// batching: pipelined updates per window (default 5000).
    #[arg(long, value_name = "N")]
    batching_updates: Option<usize>,
    /// api: acknowledged PUTs in the timed run (default 20000).
    #[arg(long, value_name = "N")]
    api_updates: Option<usize>,
    /// api: concurrent HTTP clients, one connection each (default 64).
    #[arg(long, value_name = "N")]
    api_clients: Option<usize>,
    /// wire: messages in the chat burst (default 20).
    #[arg(long, value_name = "N")]
    chat_messages: Option<usize>,
    /// Internal: open the store in DIR, report start-up figures as JSON, and exit.
    #[arg(long, hide = true, value_name = "DIR")]
    child_open: Option<PathBuf>,
    /// Internal: how long the child rests before its at-rest RSS reading, in ms.
    #[arg(long, hide = true, default_value_t = 1000)]
    child_rest_ms: u64,
}

/// The scenarios `hearth bench` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// A sets one entity, B sees the change: sequential round trips.
    Latency,
    /// Batch writes until B has converged.
    Throughput,
    /// One writer, R readers.
    Fanout,
    /// B goes offline, 1% of documents change, B returns.
    Reconnect,
    /// Opening a node whose store holds D documents.
    Coldstart,
    /// Bytes on the wire for one update and a chat burst.
    Wire,
    /// RSS at rest per document.
    Memory,
    /// Latency on an entity with a long history.
    History,
    /// Throughput and latency at several batching windows.
    Batching,
    /// Lock acquire and release, on the arbiter and through it from another device.
    Locks,
    /// Seed 001's table with real WebSocket clients: connect, message, state sync,
    /// notification, room broadcast.
    Ws,
    /// REST writes from concurrent HTTP clients, acknowledged updates a second.
    Api,
}

impl Scenario {
    /// The name reports use for it.
    fn name(self) -> &'static str {
        match self {
            Self::Latency => "latency",
            Self::Throughput => "throughput",
            Self::Fanout => "fanout",
            Self::Reconnect => "reconnect",
            Self::Coldstart => "coldstart",
            Self::Wire => "wire",
            Self::Memory => "memory",
            Self::History => "history",
            Self::Batching => "batching",
            Self::Locks => "locks",
            Self::Ws => "ws",
            Self::Api => "api",
        }
    }
}

/// Sizes after defaults and --quick are applied.
#[derive(Clone, Debug)]
pub(crate) struct Sizes {
    pub(crate) quick: bool,
    pub(crate) updates: usize,
    pub(crate) throughput_updates: usize,
    pub(crate) entities: usize,
    pub(crate) batch: usize,
    pub(crate) readers: Vec<usize>,
    pub(crate) fanout_updates: usize,
    pub(crate) reconnect_docs: Vec<usize>,
    pub(crate) store_docs: Vec<usize>,
    pub(crate) history_changes: usize,
    pub(crate) windows: Vec<Duration>,
    pub(crate) batching_updates: usize,
    pub(crate) chat_messages: usize,
    pub(crate) api_updates: usize,
    pub(crate) api_clients: usize,
    pub(crate) rest: Duration,
}

impl Sizes {
    fn from_args(a: &BenchArgs) -> Self {
        let q = a.quick;
        let pick =
            |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        let list = |v: &Option<Vec<usize>>, full: &[usize], quick: &[usize]| {
            v.clone()
                .unwrap_or_else(|| if q { quick.to_vec() } else { full.to_vec() })
        };
        Sizes {
            quick: q,
            updates: pick(a.updates, 2000, 100),
            throughput_updates: pick(a.throughput_updates, 20_000, 1000),
            entities: pick(a.entities, 100, 10),
            batch: pick(a.batch, 1000, 250).max(1),
            readers: list(&a.readers, &[1, 3, 5, 9], &[1, 2]),
            fanout_updates: pick(a.fanout_updates, 500, 30),
            reconnect_docs: list(&a.reconnect_docs, &[100, 1000, 10_000], &[50]),
            store_docs: list(&a.store_docs, &[1000, 10_000], &[100]),
            history_changes: pick(a.history_changes, 100_000, 500),
            windows: a
                .windows
                .clone()
                .unwrap_or_else(|| vec![0, 1, 5])
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            batching_updates: pick(a.batching_updates, 5000, 200),
            chat_messages: pick(a.chat_messages, 20, 20),
            api_updates: pick(a.api_updates, 20_000, 1000),
            api_clients: pick(a.api_clients, 64, 64),
            rest: Duration::from_millis(if q { 200 } else { 1000 }),
        }
    }
}

/// Runs `hearth bench`.
pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(dir) = &args.child_open {
        return runtime.block_on(child::open(dir, Duration::from_millis(args.child_rest_ms)));
    }
    let sizes = Sizes::from_args(&args);
    let wanted = |s: Scenario| args.only.is_empty() || args.only.contains(&s);
    let report = runtime.block_on(async {
        let mut scratch = cluster::Scratch::new()?;
        let mut report = Report::new(&sizes);
        report.set_floor(scenarios::floor(&sizes).await?);
        let order = [
            Scenario::Latency,
            Scenario::Throughput,
            Scenario::Fanout,
            Scenario::Reconnect,
            Scenario::Coldstart,
            Scenario::Memory,
            Scenario::Wire,
            Scenario::History,
            Scenario::Batching,
            Scenario::Locks,
            Scenario::Ws,
            Scenario::Api,
        ];
        let mut stores = None;
        let mut failed = Vec::new();
        let chosen: Vec<Scenario> = order.into_iter().filter(|s| wanted(*s)).collect();
        let bar = crate::cli::progress::bar(chosen.len() as u64, "bench");
        for s in chosen {
            if crate::cli::progress::shown() {
                bar.set_message(s.name());
            } else if !args.json {
                eprintln!("running {s:?}");
            }
            let done: Result<Vec<ScenarioReport>> = async {
                Ok(match s {
                    Scenario::Latency => scenarios::latency(&mut scratch, &sizes, &report).await?,
                    Scenario::Throughput => scenarios::throughput(&mut scratch, &sizes).await?,
                    Scenario::Fanout => scenarios::fanout(&mut scratch, &sizes).await?,
                    Scenario::Reconnect => scenarios::reconnect(&mut scratch, &sizes).await?,
                    Scenario::Coldstart | Scenario::Memory => {
                        if stores.is_none() {
                            stores = Some(child::measure_stores(&mut scratch, &sizes).await?);
                        }
                        let runs = stores.as_deref().unwrap_or_default();
                        if s == Scenario::Coldstart {
                            child::coldstart_report(runs)
                        } else {
                            child::memory_report(runs)
                        }
                    }
                    Scenario::Wire => scenarios::wire(&mut scratch, &sizes).await?,
                    Scenario::History => scenarios::history(&mut scratch, &sizes, &report).await?,
                    Scenario::Batching => scenarios::batching(&mut scratch, &sizes).await?,
                    Scenario::Locks => scenarios::locks(&mut scratch, &sizes).await?,
                    Scenario::Ws => ws::ws(&mut scratch, &sizes).await?,
                    Scenario::Api => api::api(&mut scratch, &sizes).await?,
                })
            }
            .await;
            // One scenario that fails (a size that does not converge in time, say) is
            // reported as failed; the others still run and report.
            match done {
                Ok(done) => report.scenarios.extend(done),
                Err(error) => {
                    let name = s.name();
                    failed.push(format!("{name}: {error:#}"));
                    report
                        .scenarios
                        .push(ScenarioReport::failed(name, format!("{error:#}")));
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok::<_, anyhow::Error>((report, failed))
    })?;
    let (report, failed) = report;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !failed.is_empty() {
        bail!("{} scenario(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}
