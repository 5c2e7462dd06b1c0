//! Emergency alerts through the library: the kitchen device raises a critical alert
//! while the hallway device is off; the hallway device gets it (`Event::Alert` on its
//! event stream) as soon as it starts, and the kitchen's receipt turns acknowledged.
//!
//! ```text
//! cargo run --example emergency
//! ```
//!
//! Both nodes listen on 127.0.0.1 only, with mDNS off.

use std::time::Duration;

use hearth::{Event, EventItem, NewAlert, Node, NodeBuilder, ReceiptState, Severity};

/// A node of this example: loopback only, mDNS off, headless.
fn node(dir: &std::path::Path, name: &str, listen: &str) -> NodeBuilder {
    Node::builder()
        .data_dir(dir)
        .device_name(name)
        .listen([listen])
        .mdns(false)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::temp_dir().join(format!("hearth-emergency-{}", std::process::id()));
    let (dir_a, dir_b) = (base.join("kitchen"), base.join("hallway"));
    let any_port = "/ip4/127.0.0.1/tcp/0";

    let kitchen = node(&dir_a, "kitchen", any_port).start().await?;
    let invite = kitchen.invite(Duration::from_secs(60)).await?;
    // The hallway device joins (it will keep the kitchen dialled) but is not running yet.
    Node::join(&invite.code, node(&dir_b, "hallway", any_port).config()).await?;

    let record = kitchen
        .alerts()
        .send(
            NewAlert::new("smoke detected in the kitchen")
                .severity(Severity::Critical)
                .ttl(Duration::from_secs(600)),
        )
        .await?;
    let hallway_id = record.receipts[0].device.clone();
    println!(
        "raised alert {} for {} device(s); hallway's receipt: {:?}",
        record.alert.id,
        record.receipts.len(),
        record.receipts[0].state
    );

    // The hallway device comes up and gets the alert it missed.
    let hallway = node(&dir_b, "hallway", any_port).start().await?;
    let mut events = hallway.events();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.next().await {
                Some(EventItem::Event(Event::Alert { alert, .. })) => return Ok(*alert),
                Some(_) => continue,
                None => anyhow::bail!("the hallway node stopped"),
            }
        }
    })
    .await;
    let alert = match got {
        Ok(alert) => alert?,
        // Raised before this stream was subscribed: it is in the list all the same.
        Err(_) => hallway
            .alerts()
            .get(&record.alert.id)
            .await
            .map(|r| r.alert)?,
    };
    println!(
        "hallway: emergency.alert {:?} ({}), from {}",
        alert.message,
        alert.severity.as_str(),
        alert.source.device
    );

    // The kitchen's receipt for the hallway turns acknowledged.
    for _ in 0..300 {
        let now = kitchen.alerts().get(&record.alert.id).await?;
        let state = now
            .receipts
            .iter()
            .find(|r| r.device == hallway_id)
            .map(|r| r.state);
        if state == Some(ReceiptState::Acknowledged) {
            println!("kitchen: the hallway acknowledged the alert");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    hallway.shutdown().await?;
    kitchen.shutdown().await?;
    std::fs::remove_dir_all(&base)?;
    Ok(())
}
