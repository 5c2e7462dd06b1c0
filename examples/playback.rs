//! Synchronised playback through the library: the living-room device starts a song two
//! seconds from now on itself and the bedroom device. Each device converts the start to
//! its own clock with its estimate of the living room's (from clock probes), raises
//! `coordination.sync_playback` with its local start, and the living room shows both.
//!
//! ```text
//! cargo run --example playback
//! ```
//!
//! Both nodes listen on 127.0.0.1 only, with mDNS off.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth::{DeviceSchedule, Event, EventItem, NewPlayback, Node, NodeBuilder};

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
    let base = std::env::temp_dir().join(format!("hearth-playback-{}", std::process::id()));
    let living = node(&base.join("living"), "living-room").start().await?;
    let invite = living.invite(Duration::from_secs(60)).await?;
    Node::join(
        &invite.code,
        node(&base.join("bedroom"), "bedroom").config(),
    )
    .await?;
    let bedroom = node(&base.join("bedroom"), "bedroom").start().await?;
    let mut bedroom_events = bedroom.events();

    // Wait until the bedroom has estimated the living room's clock.
    let living_id = living.peer_id().to_string();
    let estimate = loop {
        let clocks = bedroom.playback().clocks().await?;
        if let Some((_, e)) = clocks.into_iter().find(|(p, _)| p.as_str() == living_id) {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "bedroom: the living room's clock is {:+.3} ms from mine (± {:.3} ms, round trip {:.3} ms)",
        estimate.offset_ms, estimate.uncertainty_ms, estimate.rtt_ms
    );

    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let started = living
        .playback()
        .start(NewPlayback {
            media: "http://nas.local/music/lullaby.flac".into(),
            start_at: now_ms + 2000,
            device_ids: vec![],
        })
        .await?;
    println!(
        "living room: playback {} starts at {} ms",
        started.id, started.start_at
    );

    let data = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match bedroom_events.next().await {
                Some(EventItem::Event(Event::Coordination {
                    name: "coordination.sync_playback",
                    data,
                    ..
                })) => return Ok(data),
                Some(_) => continue,
                None => anyhow::bail!("the bedroom node stopped"),
            }
        }
    })
    .await??;
    println!(
        "bedroom: coordination.sync_playback, local start {}",
        data["local_start_at"]
    );

    // The living room shows both devices once the bedroom reported.
    for _ in 0..100 {
        let shown = living.playback().get(&started.id).await?;
        if shown
            .devices
            .iter()
            .all(|d| d.state == DeviceSchedule::Scheduled)
        {
            for d in shown.devices {
                println!(
                    "living room: {} starts at {:?} (offset {:?} ms, ± {:?} ms)",
                    d.name, d.local_start_at, d.offset_ms, d.uncertainty_ms
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    bedroom.shutdown().await?;
    living.shutdown().await?;
    std::fs::remove_dir_all(&base)?;
    Ok(())
}
