//! Homes in one process: the neighbours pair their homes with a home code, one shares its
//! porch light with the other, the other switches it, and then the owner takes the grant
//! back, which rotates the light's key. A third home keeps its grant. Prints what each
//! side sees, the time from unshare until the remaining home reads a write sealed under
//! the new epoch, and what a rotation cost.
//!
//! ```text
//! cargo run --release --example share_entity [HISTORY]
//! ```
//!
//! HISTORY (default 1000) is how many changes the light has before the rotation is timed.
//! Both nodes listen on 127.0.0.1 only, with mDNS off.

use std::time::{Duration, Instant};

use hearth::{EntityWrite, Node, NodeBuilder, Rights};

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

/// Polls until `node` shows `id` in `state`.
async fn wait_state(node: &Node, id: &str, state: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Some(e) = node.entities().get(id).await?
            && e.state == state
        {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{id} never reached {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let history: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1000);
    let base = std::env::temp_dir().join(format!("hearth-share-{}", std::process::id()));
    let owner = node(&base.join("maple"), "maple-hub").start().await?;
    let neighbour = node(&base.join("oak"), "oak-hub").start().await?;
    let third = node(&base.join("elm"), "elm-hub").start().await?;

    let code = owner.invite_home(Duration::from_secs(60)).await?;
    let paired = neighbour.shares().pair(&code.code).await?;
    println!("oak paired with home {} ({})", paired.name, paired.home_id);
    let code = owner.invite_home(Duration::from_secs(60)).await?;
    third.shares().pair(&code.code).await?;

    owner.entities().set("light.porch", write("off")).await?;
    let grant = owner
        .shares()
        .share("light.porch", neighbour.home_id(), Rights::Write, None)
        .await?;
    println!("maple shares light.porch with oak: {} rights", grant.rights);
    owner
        .shares()
        .share("light.porch", third.home_id(), Rights::Read, None)
        .await?;
    wait_state(&neighbour, "light.porch", "off").await?;
    neighbour.entities().set("light.porch", write("on")).await?;
    let seen = wait_state(&owner, "light.porch", "on").await?;
    println!("oak switched it on; maple saw it after {seen:?}");

    // History for the rotation figure, then the unshare, timed until a new write under
    // the new epoch is visible on the owner's side of the grant (its own view).
    for i in 0..history {
        owner
            .entities()
            .set("light.porch", write(&format!("v{i}")))
            .await?;
    }
    let before = owner.sync_counters().await?;
    let started = Instant::now();
    let out = owner
        .shares()
        .unshare("light.porch", neighbour.home_id())
        .await?;
    let rotated = started.elapsed();
    let after = owner.sync_counters().await?;
    println!(
        "unshared: new epoch {} after {rotated:?} with {history} changes of history; \
         {} bytes of frames sent during the rotation",
        out.epoch,
        after.frame_bytes_sent - before.frame_bytes_sent
    );
    owner.entities().set("light.porch", write("secret")).await?;
    wait_state(&third, "light.porch", "secret").await?;
    println!(
        "elm, still granted, read the first write under the new epoch {:?} after the unshare began",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = neighbour.entities().get("light.porch").await?;
    println!(
        "oak still reads light.porch as {:?}: nothing written after the unshare",
        kept.map(|e| e.state)
    );

    owner.shutdown().await?;
    neighbour.shutdown().await?;
    third.shutdown().await?;
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
