//! The node's event bus through the library: a middleware that tags every event, a
//! priority handler, a handler that fails (and lands in the dead-letter queue), a bounded
//! stream, `wait_for`, and the history and stats after a few writes.
//!
//! ```text
//! cargo run --example events
//! ```
//!
//! The node uses a temporary data dir, loopback only, with mDNS off.

use std::time::Duration;

use hearth::bus::{Filter, Pattern, SubscribeOptions};
use hearth::{EntityWrite, Node};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("hearth-events-{}", std::process::id()));
    let node = Node::builder()
        .data_dir(&data)
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
        .start()
        .await?;
    let bus = node.bus();

    bus.pre(|event| Some(event.with_metadata("seen_by", "example".into())));
    bus.subscribe_with(
        Filter::new("entity.*")?.subjects(["light.porch"]),
        SubscribeOptions {
            priority: 10,
            label: Some("porch".into()),
            ..SubscribeOptions::default()
        },
        |event| {
            println!(
                "porch handler: {} is {}",
                event.subject, event.data["state"]
            );
            Ok(())
        },
    );
    bus.subscribe(Filter::new("entity.changed")?, |event| {
        if event.data["state"] == "broken" {
            return Err(format!("cannot handle {}", event.subject));
        }
        Ok(())
    });
    let mut stream = bus.stream(Filter::all(), 16);
    let waiting = bus.wait_for("entity.changed", Duration::from_secs(10))?;

    let write = |state: &str, correlation: Option<&str>| EntityWrite {
        state: state.into(),
        correlation_id: correlation.map(str::to_string),
        ..EntityWrite::default()
    };
    node.entities()
        .set("light.porch", write("on", Some("req-1")))
        .await?;
    node.entities()
        .set("sensor.door", write("broken", None))
        .await?;

    if let Some(first) = waiting.await {
        println!(
            "wait_for: {} {} (correlation {:?})",
            first.name, first.subject, first.correlation_id
        );
    }
    for _ in 0..2 {
        if let Some(event) = stream.recv().await {
            println!(
                "stream: {} {} by {} {:?}",
                event.name, event.subject, event.source.device, event.metadata
            );
        }
    }
    for letter in bus.dead_letters() {
        println!("dead letter: {} ({})", letter.error, letter.event.subject);
    }
    let history = bus.history(&Pattern::parse("entity.*")?, 10);
    println!("history: {} entity events", history.len());
    let stats = bus.stats();
    for (name, s) in &stats.by_name {
        println!(
            "stats: {name}: {} published, {} delivered, {} errors, {:?} in handlers",
            s.published, s.delivered, s.handler_errors, s.handler_time
        );
    }

    node.shutdown().await?;
    std::fs::remove_dir_all(&data)?;
    Ok(())
}
