//! Nodes for the bench: devices of one home on loopback (mDNS off, encryption on, as in
//! production), paired by invite codes in one process, and the checks that show they
//! converged.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hearth::{Config, EntityWrite, Event, EventItem, Node};
use serde::Serialize;

/// How long any one wait of the bench may take before the run fails.
pub(crate) const WAIT: Duration = Duration::from_secs(120);

/// Where every node of this run keeps its data; removed at the end.
pub(crate) struct Scratch {
    root: PathBuf,
    next: usize,
}

impl Scratch {
    pub(crate) fn new() -> Result<Self> {
        let root = std::env::temp_dir().join(format!("hearth-bench-{}", std::process::id()));
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        Ok(Self { root, next: 0 })
    }

    /// A fresh data dir.
    pub(crate) fn dir(&mut self, name: &str) -> PathBuf {
        self.next += 1;
        self.root.join(format!("{}-{name}", self.next))
    }

    /// Removes a data dir that is no longer needed, so a long run does not fill the disk.
    pub(crate) fn discard(&self, dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A node's config for the bench: loopback only, no mDNS, the given batching window.
pub(crate) fn config(dir: &Path, name: &str, window: Duration) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        device_name: Some(name.into()),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
        static_peers: Vec::new(),
        batch_window: window,
        ..Config::default()
    }
}

/// One device of the bench's home.
pub(crate) struct Device {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) window: Duration,
    pub(crate) node: Node,
}

impl Device {
    /// Starts the home's first device.
    pub(crate) async fn first(scratch: &mut Scratch, name: &str, window: Duration) -> Result<Self> {
        let dir = scratch.dir(name);
        let node = Node::start(config(&dir, name, window))
            .await
            .with_context(|| format!("cannot start node {name}"))?;
        Ok(Self {
            name: name.into(),
            dir,
            window,
            node,
        })
    }

    /// Pairs a new device with `self` by invite code, starts it, and waits until both
    /// admitted each other.
    pub(crate) async fn invite(&self, scratch: &mut Scratch, name: &str) -> Result<Device> {
        let dir = scratch.dir(name);
        let invite = self.node.invite(Duration::from_secs(600)).await?;
        Node::join(&invite.code, &config(&dir, name, self.window))
            .await
            .with_context(|| format!("{name} could not join"))?;
        let node = Node::start(config(&dir, name, self.window)).await?;
        let device = Device {
            name: name.into(),
            dir,
            window: self.window,
            node,
        };
        wait_admitted(&self.node, device.node.peer_id()).await?;
        wait_admitted(&device.node, self.node.peer_id()).await?;
        Ok(device)
    }

    /// Starts this device again from its data dir (after [`Device::stop`]).
    pub(crate) async fn restart(name: &str, dir: PathBuf, window: Duration) -> Result<Device> {
        let node = Node::start(config(&dir, name, window)).await?;
        Ok(Device {
            name: name.into(),
            dir,
            window,
            node,
        })
    }

    /// Stops the node; its data dir stays.
    pub(crate) async fn stop(self) -> Result<(String, PathBuf)> {
        self.node.shutdown().await?;
        Ok((self.name, self.dir))
    }

    /// The root hash over every document's heads on this device.
    pub(crate) async fn heads(&self) -> Result<String> {
        Ok(self.node.sync_counters().await?.heads_root)
    }
}

async fn wait_admitted(node: &Node, peer: &str) -> Result<()> {
    let started = Instant::now();
    while !node.admitted_peers().await?.iter().any(|p| p == peer) {
        ensure!(started.elapsed() < WAIT, "{peer} was never admitted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// One node's final heads, as the report shows them.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct NodeHeads {
    pub(crate) node: String,
    pub(crate) heads: String,
}

/// Waits until every device shows the same non-empty heads root, and returns each one's.
/// Fails when they do not agree within [`WAIT`].
pub(crate) async fn converge(devices: &[&Device]) -> Result<Vec<NodeHeads>> {
    let started = Instant::now();
    loop {
        let mut heads = Vec::with_capacity(devices.len());
        for d in devices {
            heads.push(NodeHeads {
                node: d.name.clone(),
                heads: d.heads().await?,
            });
        }
        let agree = heads
            .iter()
            .all(|h| !h.heads.is_empty() && h.heads == heads[0].heads);
        if agree {
            return Ok(heads);
        }
        if started.elapsed() > WAIT {
            bail!("devices did not converge: {heads:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A write of `state` with no attributes.
pub(crate) fn write(state: String) -> EntityWrite {
    EntityWrite {
        state,
        ..EntityWrite::default()
    }
}

/// Waits on `changes` for entity `id` to reach `state`.
pub(crate) async fn wait_change(changes: &mut hearth::Events, id: &str, state: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, changes.next()).await {
            Err(_) => bail!("{id} never reached {state}"),
            Ok(Some(EventItem::Event(Event::Entity(c))))
                if c.entity.id == id && c.entity.state == state =>
            {
                return Ok(());
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("the node stopped"),
        }
    }
}

/// Creates `count` entities `sensor.bN` on `device` in batches, and returns their ids.
pub(crate) async fn populate(device: &Device, count: usize, state: &str) -> Result<Vec<String>> {
    let ids: Vec<String> = (0..count).map(|i| format!("sensor.b{i}")).collect();
    for chunk in ids.chunks(1000) {
        let writes = chunk
            .iter()
            .map(|id| (id.into(), write(state.to_string())))
            .collect();
        device.node.entities().set_many(writes).await?;
    }
    Ok(ids)
}

/// Process CPU time (user + system) of every thread so far. The kernel reports it in
/// USER_HZ ticks, which are 1/100 s on Linux.
pub(crate) fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Resident set size of this process in bytes.
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
