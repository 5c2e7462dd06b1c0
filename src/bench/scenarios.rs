//! The in-process scenarios: each builds its own devices of one home, measures, and ends
//! with every node's heads.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use hearth::{EntityWrite, Event, EventItem};

use super::Sizes;
use super::cluster::{self, Device, Scratch, converge, wait_change, write};
use super::floor::{self, p50_95_99, percentile_us};
use super::report::{Figure, Floor, Report, ScenarioReport};

/// The sync engine's delay before a confirmation round after a push.
const CONFIRM_AFTER_MS: u64 = hearth_crdt::engine::DEFAULT_CONFIRM_AFTER_MS;
/// Pipelined batch writes in flight in the throughput scenario.
const BATCHES_IN_FLIGHT: usize = 4;
/// Pipelined single writes in flight in the batching scenario.
const WRITES_IN_FLIGHT: usize = 64;

/// The floor's parts, measured now.
pub(crate) async fn floor(sizes: &Sizes) -> Result<Floor> {
    let n = sizes.updates.max(100);
    let mut echo = floor::tcp_echo(n).await?;
    let mut am = floor::automerge_put_apply(n)?;
    let (e50, e95, _) = p50_95_99(&mut echo);
    let (a50, a95, _) = p50_95_99(&mut am);
    Ok(Floor {
        samples: n,
        tcp_echo_p50_us: e50,
        tcp_echo_p95_us: e95,
        automerge_put_apply_p50_us: a50,
        automerge_put_apply_p95_us: a95,
        floor_p50_us: e50 + a50,
        floor_p95_us: e95 + a95,
    })
}

/// A and B, devices of one home, with `window` on both.
async fn pair(scratch: &mut Scratch, window: Duration) -> Result<(Device, Device)> {
    let a = Device::first(scratch, "a", window).await?;
    let b = a.invite(scratch, "b").await?;
    Ok((a, b))
}

async fn stop_all(scratch: &Scratch, devices: Vec<Device>) -> Result<()> {
    for d in devices {
        let (_, dir) = d.stop().await?;
        scratch.discard(&dir);
    }
    Ok(())
}

/// Creates `id` on A and waits until B has it.
async fn create_seen(a: &Device, b: &Device, id: &str) -> Result<()> {
    let mut changes = b.node.events();
    a.node.entities().set(id, write("init".into())).await?;
    wait_change(&mut changes, id, "init").await
}

/// `n` sequential updates of `id` on A, each sent after B saw the previous one: the time
/// from each write to B's change event. Acknowledgements are checked, but not waited for
/// between updates (they follow the window's flush, which the push does not wait for).
async fn sequential(
    a: &Device,
    b: &Device,
    id: &str,
    tag: &str,
    n: usize,
) -> Result<Vec<Duration>> {
    let mut changes = b.node.events();
    let mut samples = Vec::with_capacity(n);
    let mut acks = Vec::new();
    for i in 0..n {
        let state = format!("{tag}{i}");
        let entities = a.node.entities();
        let (id_owned, sent) = (id.to_string(), write(state.clone()));
        let started = Instant::now();
        acks.push(tokio::spawn(
            async move { entities.set(&id_owned, sent).await },
        ));
        wait_change(&mut changes, id, &state).await?;
        samples.push(started.elapsed());
        if acks.len() >= WRITES_IN_FLIGHT {
            for ack in acks.drain(..) {
                ack.await??;
            }
        }
    }
    for ack in acks {
        ack.await??;
    }
    Ok(samples)
}

fn floor_of(report: &Report) -> (f64, f64) {
    report
        .floor
        .as_ref()
        .map(|f| (f.floor_p50_us, f.floor_p95_us))
        .unwrap_or((0.0, 0.0))
}

/// 1. latency: A sets one entity, B sees the change.
pub(crate) async fn latency(
    scratch: &mut Scratch,
    sizes: &Sizes,
    report: &Report,
) -> Result<Vec<ScenarioReport>> {
    let (a, b) = pair(scratch, hearth::DEFAULT_BATCH_WINDOW).await?;
    create_seen(&a, &b, "light.latency").await?;
    let mut samples = sequential(&a, &b, "light.latency", "l", sizes.updates).await?;
    let (p50, p95, p99) = p50_95_99(&mut samples);
    let mut echo = floor::tcp_echo(sizes.updates).await?;
    let (e50, e95, e99) = p50_95_99(&mut echo);
    let (f50, f95) = floor_of(report);
    let nodes = converge(&[&a, &b]).await?;
    stop_all(scratch, vec![a, b]).await?;
    Ok(vec![
        ScenarioReport::new("latency", format!("{} updates", sizes.updates), nodes)
            .figure(Figure::new("p50", p50, "us").baseline("tcp echo p50", e50))
            .figure(
                Figure::new("p95", p95, "us")
                    .baseline("tcp echo p95", e95)
                    .target("<= 1000 us", p95 <= 1000.0),
            )
            .figure(Figure::new("p99", p99, "us").baseline("tcp echo p99", e99))
            .figure(Figure::new("p50 vs floor", p50, "us").baseline("floor p50", f50))
            .figure(
                Figure::new("p95 vs floor", p95, "us")
                    .baseline("floor p95", f95)
                    .target("<= 5x floor", f95 > 0.0 && p95 <= 5.0 * f95),
            ),
    ])
}

/// Batch writes of `updates` updates spread over `ids`, `batch` per call with a few calls
/// in flight; returns when every write is acknowledged.
async fn batch_writes(
    a: &Device,
    ids: &[String],
    updates: usize,
    batch: usize,
    tag: &str,
) -> Result<()> {
    let mut pending = VecDeque::new();
    let mut next = 0;
    while next < updates {
        let n = batch.min(updates - next);
        let writes: Vec<(hearth::EntityId, EntityWrite)> = (next..next + n)
            .map(|k| {
                (
                    ids[k % ids.len()].as_str().into(),
                    write(format!("{tag}{k}")),
                )
            })
            .collect();
        let entities = a.node.entities();
        pending.push_back(tokio::spawn(async move { entities.set_many(writes).await }));
        if pending.len() >= BATCHES_IN_FLIGHT
            && let Some(first) = pending.pop_front()
        {
            first.await??;
        }
        next += n;
    }
    for p in pending {
        p.await??;
    }
    Ok(())
}

/// 2. throughput: batch writes on A until B has converged.
pub(crate) async fn throughput(
    scratch: &mut Scratch,
    sizes: &Sizes,
) -> Result<Vec<ScenarioReport>> {
    let (a, b) = pair(scratch, hearth::DEFAULT_BATCH_WINDOW).await?;
    let ids = cluster::populate(&a, sizes.entities, "0").await?;
    converge(&[&a, &b]).await?;
    let n = sizes.throughput_updates;
    let started = Instant::now();
    batch_writes(&a, &ids, n, sizes.batch, "t").await?;
    let acked = started.elapsed();
    let nodes = converge(&[&a, &b]).await?;
    let took = started.elapsed();
    let baseline = floor::tcp_echo_throughput(n).await?;
    let rate = n as f64 / took.as_secs_f64();
    stop_all(scratch, vec![a, b]).await?;
    Ok(vec![
        ScenarioReport::new(
            "throughput",
            format!(
                "{n} updates over {} entities, {} per batch",
                ids.len(),
                sizes.batch
            ),
            nodes,
        )
        .figure(
            Figure::new("updates/s until B converged", rate, "/s")
                // The echo moves one message per round, the updates go in batches:
                // the label says so, as the two are not like for like.
                .baseline(
                    format!(
                        "unbatched tcp echo, {} B msgs/s (updates go {} per batch)",
                        floor::ECHO_BYTES,
                        sizes.batch
                    ),
                    baseline,
                )
                .target(">= 20000/s", rate >= 20_000.0),
        )
        .figure(Figure::new(
            "updates/s acknowledged on A",
            n as f64 / acked.as_secs_f64(),
            "/s",
        )),
    ])
}

/// 3. fanout: one writer, R readers.
pub(crate) async fn fanout(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<ScenarioReport>> {
    let a = Device::first(scratch, "writer", hearth::DEFAULT_BATCH_WINDOW).await?;
    let id = "light.fanout";
    a.node.entities().set(id, write("init".into())).await?;
    let mut readers: Vec<Device> = Vec::new();
    let mut out = Vec::new();
    let mut counts = sizes.readers.clone();
    counts.sort_unstable();
    for r in counts {
        while readers.len() < r {
            let name = format!("reader{}", readers.len() + 1);
            readers.push(a.invite(scratch, &name).await?);
        }
        let mut all: Vec<&Device> = vec![&a];
        all.extend(readers.iter());
        converge(&all).await?;
        // One forwarder per reader reports which update it saw.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<usize>(1024);
        let tag = format!("f{r}-");
        let mut forwarders = Vec::new();
        for reader in &readers {
            let mut changes = reader.node.events();
            let (tx, tag) = (tx.clone(), tag.clone());
            forwarders.push(tokio::spawn(async move {
                while let Some(item) = changes.next().await {
                    if let EventItem::Event(Event::Entity(c)) = item
                        && c.entity.id == "light.fanout"
                        && let Some(i) = c.entity.state.strip_prefix(&tag)
                        && let Ok(i) = i.parse::<usize>()
                        && tx.send(i).await.is_err()
                    {
                        return;
                    }
                }
            }));
        }
        drop(tx);
        let n = sizes.fanout_updates;
        let mut samples = Vec::with_capacity(n);
        let cpu_before = cluster::cpu_time();
        let mut acks = Vec::new();
        for i in 0..n {
            let entities = a.node.entities();
            let sent = write(format!("{tag}{i}"));
            let started = Instant::now();
            acks.push(tokio::spawn(async move {
                entities.set("light.fanout", sent).await
            }));
            let mut seen = 0;
            while seen < r {
                match tokio::time::timeout(cluster::WAIT, rx.recv()).await {
                    Ok(Some(j)) if j == i => seen += 1,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => bail!("readers stopped seeing updates"),
                }
            }
            samples.push(started.elapsed());
        }
        for ack in acks {
            ack.await??;
        }
        let cpu = match (cpu_before, cluster::cpu_time()) {
            (Some(before), Some(after)) => (after - before).as_secs_f64() * 1e6 / n as f64,
            _ => 0.0,
        };
        for f in forwarders {
            f.abort();
        }
        let nodes = converge(&all).await?;
        let p50 = percentile_us(&mut samples, 0.50);
        let p95 = percentile_us(&mut samples, 0.95);
        let target = match r {
            ..=5 => Some(("<= 2000 us", p95 <= 2000.0)),
            9.. => Some(("<= 5000 us", p95 <= 5000.0)),
            _ => None,
        };
        let mut p95f = Figure::new("p95 until every reader saw it", p95, "us");
        if let Some((t, met)) = target {
            p95f = p95f.target(t, met);
        }
        out.push(
            ScenarioReport::new("fanout", format!("R={r}, {n} updates"), nodes)
                .figure(Figure::new("p50 until every reader saw it", p50, "us"))
                .figure(p95f)
                .figure(Figure::new("CPU per update, all nodes", cpu, "us")),
        );
    }
    readers.push(a);
    stop_all(scratch, readers).await?;
    Ok(out)
}

/// 4. reconnect: B goes away, 1% of the shared documents change, B returns.
pub(crate) async fn reconnect(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<ScenarioReport>> {
    let mut out = Vec::new();
    for &d in &sizes.reconnect_docs {
        let window = hearth::DEFAULT_BATCH_WINDOW;
        let (a, b) = pair(scratch, window).await?;
        let ids = cluster::populate(&a, d, "0").await?;
        converge(&[&a, &b]).await?;
        let (b_name, b_dir) = b.stop().await?;
        let mut figures = Vec::new();
        let changed = (d / 100).max(1);
        let mut last_nodes = Vec::new();
        for (label, n) in [("no change", 0), ("1% changed", changed)] {
            if n > 0 {
                let writes = ids[..n]
                    .iter()
                    .map(|id| (id.into(), write("1".into())))
                    .collect();
                a.node.entities().set_many(writes).await?;
            }
            let a_before = a.node.sync_counters().await?;
            let started = Instant::now();
            let b = Device::restart(&b_name, b_dir.clone(), window).await?;
            let opened = started.elapsed();
            let resumed = Instant::now();
            while b.node.sync_counters().await?.reconciliations == 0 {
                ensure!(
                    resumed.elapsed() < cluster::WAIT,
                    "no digest exchange after reconnect"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            last_nodes = converge(&[&a, &b]).await?;
            let took = resumed.elapsed();
            let c = b.node.sync_counters().await?;
            let a_after = a.node.sync_counters().await?;
            let bytes = c.frame_bytes_sent + c.frame_bytes_received;
            let frames = c.frames_sent + c.frames_received;
            let a_sent = a_after.frame_bytes_sent - a_before.frame_bytes_sent;
            let round_trips = c.digest_messages.div_ceil(2);
            let mut time = Figure::new(
                format!("{label}: time to converge"),
                took.as_secs_f64() * 1e3,
                "ms",
            );
            let mut bytes_f = Figure::new(format!("{label}: bytes both ways"), bytes as f64, "B");
            if n == 0 {
                if d >= 10_000 {
                    time = time.target("< 50 ms", took < Duration::from_millis(50));
                }
                figures.push(
                    Figure::new(
                        format!("{label}: digest round trips"),
                        round_trips as f64,
                        "",
                    )
                    .target("1", round_trips <= 1),
                );
            } else if let Some(base) = figures
                .iter()
                .find(|f: &&Figure| f.name == "no change: bytes both ways")
                .map(|f| f.value)
            {
                bytes_f = bytes_f.baseline("no change", base);
                figures.push(Figure::new(
                    format!("{label}: bytes per changed document"),
                    (bytes as f64 - base) / n as f64,
                    "B",
                ));
                figures.push(Figure::new(
                    format!("{label}: documents synced"),
                    c.docs_synced as f64,
                    "",
                ));
            }
            figures.push(time);
            figures.push(bytes_f);
            figures.push(Figure::new(
                format!("{label}: frames both ways"),
                frames as f64,
                "",
            ));
            figures.push(Figure::new(
                format!("{label}: bytes A sent"),
                a_sent as f64,
                "B",
            ));
            figures.push(Figure::new(
                format!("{label}: node start (store load)"),
                opened.as_secs_f64() * 1e3,
                "ms",
            ));
            b.stop().await?;
        }
        scratch.discard(&b_dir);
        stop_all(scratch, vec![a]).await?;
        let mut report =
            ScenarioReport::new("reconnect", format!("D={d}, {changed} changed"), last_nodes);
        report.figures = figures;
        out.push(report);
    }
    Ok(out)
}

/// 6. wire: bytes for one single-field update and for a chat burst.
pub(crate) async fn wire(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<ScenarioReport>> {
    let (a, b) = pair(scratch, hearth::DEFAULT_BATCH_WINDOW).await?;
    create_seen(&a, &b, "light.wire").await?;
    // Let the creation's confirmation round pass, so only the update is counted.
    settle().await;
    let before = a.node.sync_counters().await?;
    let mut changes = b.node.events();
    a.node
        .entities()
        .set("light.wire", write("on".into()))
        .await?;
    wait_change(&mut changes, "light.wire", "on").await?;
    let pushed = a.node.sync_counters().await?;
    settle().await;
    let settled = a.node.sync_counters().await?;
    let push_bytes = pushed.frame_bytes_sent - before.frame_bytes_sent;
    let all_bytes = (settled.frame_bytes_sent + settled.frame_bytes_received)
        - (before.frame_bytes_sent + before.frame_bytes_received);
    let change = floor::single_field_change_bytes()? as f64;
    let mut figures = vec![
        Figure::new("push frame bytes", push_bytes as f64, "B")
            .baseline("bare automerge change", change)
            .target("<= 2x", push_bytes as f64 <= 2.0 * change),
        Figure::new("incl. confirmation round, both ways", all_bytes as f64, "B"),
    ];

    // The chat burst needs rooms: one room, then N messages posted at once.
    let n = sizes.chat_messages;
    let room = a.node.rooms().create("bench", None, None).await?;
    a.node.rooms().join(&room.room_id, None).await?;
    let waited = Instant::now();
    while b.node.rooms().get(&room.room_id).await.is_err() {
        ensure!(waited.elapsed() < cluster::WAIT, "the room never reached B");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    settle().await;
    let before = a.node.sync_counters().await?;
    let text = "dinner is ready";
    let mut says = Vec::new();
    for i in 0..n {
        let rooms = a.node.rooms();
        let (room_id, msg) = (room.room_id.clone(), format!("{text} {i}"));
        says.push(tokio::spawn(async move {
            rooms.say(&room_id, None, &msg).await
        }));
    }
    for s in says {
        s.await??;
    }
    while b.node.rooms().messages(&room.room_id, n).await?.len() < n {
        ensure!(waited.elapsed() < cluster::WAIT, "the chat never reached B");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pushed = a.node.sync_counters().await?;
    let burst_bytes = pushed.frame_bytes_sent - before.frame_bytes_sent;
    let burst_frames = pushed.frames_sent - before.frames_sent;
    let chat_change = floor::chat_burst_change_bytes(n, text)? as f64;
    figures.push(
        Figure::new(
            format!("{n}-message chat burst, frame bytes"),
            burst_bytes as f64,
            "B",
        )
        .baseline("bare automerge changes", chat_change),
    );
    figures.push(Figure::new(
        format!("{n}-message chat burst, frames"),
        burst_frames as f64,
        "",
    ));
    let mut report = ScenarioReport::new(
        "wire",
        format!("single-field update, {n}-message chat burst"),
        converge(&[&a, &b]).await?,
    );
    report.figures = figures;
    stop_all(scratch, vec![a, b]).await?;
    Ok(vec![report])
}

/// Waits out the engine's confirmation delay, so later counts see only new traffic.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(CONFIRM_AFTER_MS + 200)).await;
}

/// History (scenario 8): latency on an entity whose document already holds many changes,
/// against a fresh entity's in the same pair.
pub(crate) async fn history(
    scratch: &mut Scratch,
    sizes: &Sizes,
    report: &Report,
) -> Result<Vec<ScenarioReport>> {
    let (a, b) = pair(scratch, hearth::DEFAULT_BATCH_WINDOW).await?;
    create_seen(&a, &b, "light.fresh").await?;
    create_seen(&a, &b, "light.history").await?;
    let ids = vec!["light.history".to_string()];
    let build = Instant::now();
    batch_writes(&a, &ids, sizes.history_changes, sizes.batch, "h").await?;
    converge(&[&a, &b]).await?;
    let built = build.elapsed();
    let n = sizes.updates;
    let mut fresh = sequential(&a, &b, "light.fresh", "x", n).await?;
    let mut long = sequential(&a, &b, "light.history", "y", n).await?;
    let (f50, f95, _) = p50_95_99(&mut fresh);
    let (h50, h95, h99) = p50_95_99(&mut long);
    // Reads while the long entity's history is listed, over and over. B restarts first,
    // so the listings work from the version log built as the document loaded.
    // What the long entity takes on each device: its generations are cut and the old
    // ones deleted, so this stays bounded whatever the number of changes.
    let on_a = a.node.entities().storage("light.history").await?;
    let on_b = b.node.entities().storage("light.history").await?;
    let (b_name, b_dir) = b.stop().await?;
    let b = Device::restart(&b_name, b_dir, hearth::DEFAULT_BATCH_WINDOW).await?;
    let reads = ReadsDuringHistory::measure(&b, "light.fresh", "light.history", n).await?;
    let nodes = converge(&[&a, &b]).await?;
    stop_all(scratch, vec![a, b]).await?;
    let latency_p95 = report.find("latency").and_then(|s| s.get("p95"));
    let mut r = ScenarioReport::new(
        "history",
        format!("{} changes, {n} updates", sizes.history_changes),
        nodes,
    )
    .figure(Figure::new("p50", h50, "us").baseline("fresh entity p50", f50))
    .figure(
        Figure::new("p95", h95, "us")
            .baseline("fresh entity p95", f95)
            .target("<= 1.5x fresh", h95 <= 1.5 * f95),
    )
    .figure(Figure::new("p99", h99, "us"))
    .figure(Figure::new(
        "writing the history",
        built.as_secs_f64() * 1e3,
        "ms",
    ));
    if let Some(l) = latency_p95 {
        r = r.figure(Figure::new("p95 vs latency scenario", h95, "us").baseline("latency p95", l));
    }
    let cut = hearth::HistoryConfig::default();
    r = r
        .figure(Figure::new("generations cut", on_a.generation as f64, ""))
        .figure(
            Figure::new("entity bytes on A", on_a.bytes as f64, "B").baseline(
                "bytes per change held",
                on_a.bytes as f64 / on_a.changes.max(1) as f64,
            ),
        )
        .figure(Figure::new("entity bytes on B", on_b.bytes as f64, "B"))
        .figure(
            Figure::new("changes held on A", on_a.changes as f64, "")
                .baseline(
                    "cut_changes + keep_versions",
                    (cut.cut_changes + cut.keep_versions) as f64,
                )
                .target(
                    "bounded by cut_changes + keep_versions",
                    on_a.changes <= cut.cut_changes + cut.keep_versions + sizes.batch,
                ),
        )
        .figure(Figure::new(
            "generations held on A",
            on_a.generations_held as f64,
            "",
        ));
    r = r
        .figure(Figure::new(
            "history?limit=1 after restart",
            reads.first_newest_us,
            "us",
        ))
        .figure(Figure::new(
            format!(
                "history?limit={}, mean of {}",
                hearth::MAX_HISTORY,
                reads.listings
            ),
            reads.listing_ms,
            "ms",
        ))
        .figure(
            Figure::new(
                format!("GET p95 during those listings, {n} GETs"),
                reads.busy95,
                "us",
            )
            .baseline("idle GET p95", reads.idle95)
            .target("<= 2x idle", reads.busy95 <= 2.0 * reads.idle95),
        );
    Ok(vec![r])
}

/// GETs of another entity while one entity's long history is listed over and over,
/// against the same GETs idle.
struct ReadsDuringHistory {
    /// The first `limit=1` listing after a restart.
    first_newest_us: f64,
    /// Mean time of a `limit=MAX_HISTORY` listing while the GETs ran.
    listing_ms: f64,
    /// Listings done while the GETs ran.
    listings: usize,
    idle95: f64,
    busy95: f64,
}

impl ReadsDuringHistory {
    async fn measure(device: &Device, other: &str, long: &str, n: usize) -> Result<Self> {
        let entities = device.node.entities();
        let t = Instant::now();
        entities.history(long, 1).await?;
        let first_newest_us = t.elapsed().as_secs_f64() * 1e6;
        let mut idle = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            entities.get(other).await?;
            idle.push(t.elapsed());
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let listing = {
            let entities = device.node.entities();
            let long = long.to_string();
            let stop = stop.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let mut listings = 0;
                while listings == 0 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    entities.history(&long, hearth::MAX_HISTORY).await?;
                    listings += 1;
                }
                anyhow::Ok((listings, t.elapsed()))
            })
        };
        let mut busy = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            entities.get(other).await?;
            busy.push(t.elapsed());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (listings, took) = listing.await??;
        Ok(Self {
            first_newest_us,
            listing_ms: took.as_secs_f64() * 1e3 / listings as f64,
            listings,
            idle95: percentile_us(&mut idle, 0.95),
            busy95: percentile_us(&mut busy, 0.95),
        })
    }
}

/// 9. batching: throughput and latency at several batching windows.
pub(crate) async fn batching(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<ScenarioReport>> {
    let mut out = Vec::new();
    for &window in &sizes.windows {
        let (a, b) = pair(scratch, window).await?;
        let ids = cluster::populate(&a, sizes.entities, "0").await?;
        converge(&[&a, &b]).await?;
        // Pipelined single writes: each acknowledged after its window's flush.
        let n = sizes.batching_updates;
        let started = Instant::now();
        let mut pending = VecDeque::new();
        let mut acks = Vec::with_capacity(n);
        for k in 0..n {
            let entities = a.node.entities();
            let id = ids[k % ids.len()].clone();
            pending.push_back(tokio::spawn(async move {
                let sent = Instant::now();
                entities
                    .set(&id, write(format!("w{k}")))
                    .await
                    .map(|_| sent.elapsed())
            }));
            if pending.len() >= WRITES_IN_FLIGHT
                && let Some(first) = pending.pop_front()
            {
                acks.push(first.await??);
            }
        }
        for p in pending {
            acks.push(p.await??);
        }
        converge(&[&a, &b]).await?;
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let ack95 = percentile_us(&mut acks, 0.95);
        create_seen(&a, &b, "light.batching").await?;
        let mut seq =
            sequential(&a, &b, "light.batching", "s", (sizes.updates / 4).max(20)).await?;
        let vis95 = percentile_us(&mut seq, 0.95);
        let ack_one = {
            let t = Instant::now();
            a.node
                .entities()
                .set("light.batching", write("one".into()))
                .await?;
            t.elapsed().as_secs_f64() * 1e6
        };
        let nodes = converge(&[&a, &b]).await?;
        stop_all(scratch, vec![a, b]).await?;
        out.push(
            ScenarioReport::new(
                "batching",
                format!("window {} ms", window.as_millis()),
                nodes,
            )
            .figure(Figure::new(
                format!("updates/s, {WRITES_IN_FLIGHT} writes in flight"),
                rate,
                "/s",
            ))
            .figure(Figure::new("ack p95 under that load", ack95, "us"))
            .figure(Figure::new("visible on B p95, sequential", vis95, "us"))
            .figure(Figure::new("ack of a lone write", ack_one, "us")),
        );
    }
    if out.is_empty() {
        bail!("no batching windows given");
    }
    Ok(out)
}

/// Acquire-then-release rounds of one lock on `device`, timing each call.
async fn lock_rounds(
    device: &Device,
    name: &str,
    rounds: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let locks = device.node.locks();
    let (mut acquire, mut release) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let started = Instant::now();
        let outcome = locks
            .request(hearth::LockAsk::new(
                name,
                hearth::LockType::QueueExecuting,
                "bench",
            ))
            .await?;
        acquire.push(started.elapsed());
        let hearth::LockOutcome::Granted { key, .. } = outcome else {
            anyhow::bail!("the bench's own lock on {name} was refused");
        };
        let started = Instant::now();
        locks.release(name, &key, "bench").await?;
        release.push(started.elapsed());
    }
    Ok((acquire, release))
}

/// Scenario 10, locks: acquire and release p95 on the arbiter (A) and from B through it,
/// against one sync round trip between the two measured in the same run (twice the
/// one-way latency of an entity change); the target is a round trip plus 1 ms.
pub(crate) async fn locks(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<ScenarioReport>> {
    let rounds = sizes.updates.clamp(50, 1000);
    let (a, b) = pair(scratch, hearth::DEFAULT_BATCH_WINDOW).await?;
    create_seen(&a, &b, "light.locks").await?;
    let mut one_way = sequential(&a, &b, "light.locks", "k", rounds).await?;
    let (one_way_p50, _, _) = p50_95_99(&mut one_way);
    let round_trip = 2.0 * one_way_p50;
    let (mut local_acquire, mut local_release) = lock_rounds(&a, "bench.local", rounds).await?;
    let (mut remote_acquire, mut remote_release) = lock_rounds(&b, "bench.remote", rounds).await?;
    let (_, la95, _) = p50_95_99(&mut local_acquire);
    let (_, lr95, _) = p50_95_99(&mut local_release);
    let (ra50, ra95, _) = p50_95_99(&mut remote_acquire);
    let (_, rr95, _) = p50_95_99(&mut remote_release);
    let nodes = converge(&[&a, &b]).await?;
    stop_all(scratch, vec![a, b]).await?;
    let within = |p95: f64| p95 <= round_trip + 1000.0;
    Ok(vec![
        ScenarioReport::new(
            "locks",
            format!("{rounds} acquire and release rounds"),
            nodes,
        )
        .figure(
            Figure::new("acquire p95 on the arbiter", la95, "us")
                .baseline("sync round trip", round_trip)
                .target("<= round trip + 1 ms", within(la95)),
        )
        .figure(
            Figure::new("release p95 on the arbiter", lr95, "us")
                .baseline("sync round trip", round_trip)
                .target("<= round trip + 1 ms", within(lr95)),
        )
        .figure(
            Figure::new("acquire p50 through the arbiter", ra50, "us")
                .baseline("sync round trip", round_trip),
        )
        .figure(
            Figure::new("acquire p95 through the arbiter", ra95, "us")
                .baseline("sync round trip", round_trip)
                .target("<= round trip + 1 ms", within(ra95)),
        )
        .figure(
            Figure::new("release p95 through the arbiter", rr95, "us")
                .baseline("sync round trip", round_trip)
                .target("<= round trip + 1 ms", within(rr95)),
        ),
    ])
}
