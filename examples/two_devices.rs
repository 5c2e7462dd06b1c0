//! Two devices of one home in one process: the first creates the home and invites the
//! second, which joins, starts, and receives an entity. Then it measures how long a change
//! on the first takes to become visible on the second, over sequential updates.
//!
//! ```text
//! cargo run --release --example two_devices [UPDATES]
//! ```
//!
//! Both nodes listen on 127.0.0.1 only, with mDNS off.

use std::time::{Duration, Instant};

use hearth::{EntityWrite, Event, EventItem, Events, Node, NodeBuilder};

/// A node of this example: loopback only, mDNS off, headless.
fn node(dir: &std::path::Path, name: &str) -> NodeBuilder {
    Node::builder()
        .data_dir(dir)
        .device_name(name)
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let updates: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1000);
    let base = std::env::temp_dir().join(format!("hearth-two-devices-{}", std::process::id()));
    let (dir_a, dir_b) = (base.join("a"), base.join("b"));

    let a = node(&dir_a, "kitchen").start().await?;
    let invite = a.invite(Duration::from_secs(60)).await?;
    let joined = Node::join(&invite.code, node(&dir_b, "hallway").config()).await?;
    println!(
        "hallway joined home {} ({})",
        joined.home_name, joined.home_id
    );
    let b = node(&dir_b, "hallway").start().await?;

    let mut changes = b.events();
    let write = |state: String| EntityWrite {
        state,
        ..EntityWrite::default()
    };
    a.entities().set("light.porch", write("on".into())).await?;
    wait_for(&mut changes, "on").await?;
    println!("light.porch is on, as seen on the hallway device");

    let mut micros = Vec::with_capacity(updates);
    for i in 0..updates {
        let state = format!("v{i}");
        let entities = a.entities();
        let sent = write(state.clone());
        let started = Instant::now();
        // The write is acknowledged after its flush; the push to the peer does not wait
        // for that, so time visibility on the hallway device, not the acknowledgement.
        let ack = tokio::spawn(async move { entities.set("light.porch", sent).await });
        wait_for(&mut changes, &state).await?;
        micros.push(started.elapsed().as_micros() as u64);
        ack.await??;
    }
    micros.sort_unstable();
    let pct = |p: f64| micros[((micros.len() as f64 * p) as usize).min(micros.len() - 1)];
    println!(
        "change on kitchen -> visible on hallway, {updates} sequential updates: p50 {} us, p95 {} us, p99 {} us",
        pct(0.50),
        pct(0.95),
        pct(0.99)
    );

    b.shutdown().await?;
    a.shutdown().await?;
    std::fs::remove_dir_all(&base)?;
    Ok(())
}

async fn wait_for(changes: &mut Events, state: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, changes.next()).await? {
            Some(EventItem::Event(Event::Entity(c))) if c.entity.state == state => return Ok(()),
            Some(_) => continue,
            None => anyhow::bail!("the node stopped"),
        }
    }
}
