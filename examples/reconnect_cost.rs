//! Measures what a reconnect costs between two devices of one home holding D documents,
//! with none and with some changed while one device was away.
//!
//! ```text
//! cargo run --release --example reconnect_cost [DOCS] [CHANGED]
//! ```
//!
//! Both nodes listen on 127.0.0.1 only, with mDNS off.

use std::time::{Duration, Instant};

use hearth::{EntityWrite, Node, NodeBuilder};

/// A node of this example: loopback only, mDNS off, headless.
fn node(dir: &std::path::Path, name: &str) -> NodeBuilder {
    Node::builder()
        .data_dir(dir)
        .device_name(name)
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
}

fn write(state: &str) -> EntityWrite {
    EntityWrite {
        state: state.into(),
        ..EntityWrite::default()
    }
}

async fn wait_state(node: &Node, id: &str, state: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(e) = node.entities().get(id).await?
            && e.state == state
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{id} never reached {state}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let docs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let changed: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let base = std::env::temp_dir().join(format!("hearth-reconnect-{}", std::process::id()));
    let (dir_a, dir_b) = (base.join("a"), base.join("b"));

    let a = node(&dir_a, "a").start().await?;
    let mut tasks = Vec::new();
    for i in 0..docs {
        let e = a.entities();
        tasks.push(tokio::spawn(async move {
            e.set(&format!("sensor.s{i}"), write("0")).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let invite = a.invite(Duration::from_secs(60)).await?;
    Node::join(&invite.code, node(&dir_b, "b").config()).await?;
    let b = node(&dir_b, "b").start().await?;
    wait_state(&b, &format!("sensor.s{}", docs - 1), "0").await?;
    for i in 0..docs {
        wait_state(&b, &format!("sensor.s{i}"), "0").await?;
    }

    b.shutdown().await?;
    for (label, n) in [("nochange", 0), ("changed", changed)] {
        for i in 0..n {
            a.entities()
                .set(&format!("sensor.s{i}"), write(label))
                .await?;
        }
        let before = a.sync_counters().await?;
        let started = Instant::now();
        let b = node(&dir_b, "b").start().await?;
        let opened = started.elapsed();
        while b.sync_counters().await?.reconciliations == 0 {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "no reconciliation"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for i in 0..n {
            wait_state(&b, &format!("sensor.s{i}"), label).await?;
        }
        let took = started.elapsed();
        let c = b.sync_counters().await?;
        let after = a.sync_counters().await?;
        println!(
            "D={docs}, {n} changed: store opened and node started in {opened:?}, converged at {took:?}; digest messages {} ({} bytes, both directions); \
             documents synced {}, found in sync {}; A counted {} digest bytes",
            c.digest_messages,
            c.digest_bytes,
            c.docs_synced,
            c.docs_already_in_sync,
            after.digest_bytes - before.digest_bytes
        );
        b.shutdown().await?;
    }
    a.shutdown().await?;
    std::fs::remove_dir_all(&base)?;
    Ok(())
}
