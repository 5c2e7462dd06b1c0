//! Two devices of one home in one process: the first creates the home, invites the
//! second, and creates a room; the second joins it, and the two chat through the library.
//! Each side prints the messages it receives from the other as events.
//!
//! ```text
//! cargo run --example room_chat
//! ```
//!
//! Both nodes listen on 127.0.0.1 only, with mDNS off.

use std::time::Duration;

use hearth::{Event, EventItem, Events, Node, NodeBuilder};

/// A node of this example: loopback only, mDNS off, headless.
fn node(dir: &std::path::Path, name: &str) -> NodeBuilder {
    Node::builder()
        .data_dir(dir)
        .device_name(name)
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
}

/// Waits for the next chat message in `events` and returns "sender: text".
async fn next_chat(events: &mut Events) -> anyhow::Result<String> {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("node stopped"))?;
        if let EventItem::Event(Event::Chat { message, .. }) = item {
            return Ok(format!("{}: {}", message.sender, message.message));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::temp_dir().join(format!("hearth-room-chat-{}", std::process::id()));
    let (dir_a, dir_b) = (base.join("a"), base.join("b"));

    let kitchen = node(&dir_a, "kitchen").start().await?;
    let invite = kitchen.invite(Duration::from_secs(60)).await?;
    Node::join(&invite.code, node(&dir_b, "hallway").config()).await?;
    let hallway = node(&dir_b, "hallway").start().await?;

    let mut kitchen_events = kitchen.events();
    let mut hallway_events = hallway.events();
    let room = kitchen.rooms().create("family", Some(8), None).await?;
    println!("kitchen created room {} ({})", room.name, room.room_id);

    // The room reaches the hallway device when the home's documents sync.
    loop {
        if let EventItem::Event(Event::RoomCreated { room, .. }) =
            tokio::time::timeout(Duration::from_secs(10), hallway_events.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("node stopped"))?
        {
            println!("hallway sees room {}", room.name);
            break;
        }
    }
    hallway.rooms().join("family", None).await?;

    kitchen
        .rooms()
        .say("family", None, "dinner is ready")
        .await?;
    println!(
        "hallway received  {}",
        next_chat(&mut hallway_events).await?
    );
    hallway.rooms().say("family", None, "coming!").await?;
    // The kitchen's own message comes first in its stream, then the reply.
    println!(
        "kitchen announced {}",
        next_chat(&mut kitchen_events).await?
    );
    println!(
        "kitchen received  {}",
        next_chat(&mut kitchen_events).await?
    );

    let members: Vec<String> = kitchen
        .rooms()
        .get("family")
        .await?
        .members
        .into_iter()
        .map(|m| m.user)
        .collect();
    println!("members: {}", members.join(", "));
    for m in kitchen.rooms().messages("family", 10).await? {
        println!("  {} {}: {}", m.timestamp, m.sender, m.message);
    }

    hallway.shutdown().await?;
    kitchen.shutdown().await?;
    std::fs::remove_dir_all(&base)?;
    Ok(())
}
