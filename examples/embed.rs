//! A headless node inside a program: no HTTP API, loopback only, mDNS off, a temporary
//! data dir. It sets an entity and prints the change from the node's event stream.
//!
//! ```text
//! cargo run --example embed
//! ```

use hearth::{EntityWrite, Event, EventItem, Node};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::builder()
        .data_dir(dir.path())
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
        .start()
        .await?;
    let mut events = node.events();
    let on = EntityWrite {
        state: "on".into(),
        ..EntityWrite::default()
    };
    node.entities().set("light.porch", on).await?;
    while let Some(item) = events.next().await {
        if let EventItem::Event(Event::Entity(change)) = item {
            println!("{} is {}", change.entity.id, change.entity.state);
            break;
        }
    }
    node.shutdown().await?;
    Ok(())
}
