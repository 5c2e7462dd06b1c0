//! A group trivia game through the library: the living-room device starts it for itself
//! and the kitchen device; it is `starting` until the kitchen acknowledges, then
//! `active`. Both devices add points to the kitchen's score at the same time (the scores
//! are Automerge counters, so every point counts), and the end publishes the final scores
//! on both. Then a session follows its user from the living room to the kitchen.
//!
//! ```text
//! cargo run --example trivia
//! ```
//!
//! Both nodes listen on 127.0.0.1 only, with mDNS off.

use std::time::Duration;

use hearth::{ActivityAction, NewActivity, NewSession, Node, NodeBuilder};

/// A node of this example: loopback only, mDNS off, headless.
fn node(dir: &std::path::Path, name: &str) -> NodeBuilder {
    Node::builder()
        .data_dir(dir)
        .device_name(name)
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
}

/// Polls `check` every 50 ms for up to 30 s.
async fn until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    for _ in 0..600 {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("timed out waiting until {what}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::temp_dir().join(format!("hearth-trivia-{}", std::process::id()));
    let (dir_a, dir_b) = (base.join("living-room"), base.join("kitchen"));
    let living = node(&dir_a, "living-room").start().await?;
    let invite = living.invite(Duration::from_secs(60)).await?;
    Node::join(&invite.code, node(&dir_b, "kitchen").config()).await?;
    let kitchen = node(&dir_b, "kitchen").start().await?;
    let kitchen_id = kitchen.peer_id().to_string();
    until("the devices meet", || async {
        Ok(living
            .admitted_peers()
            .await?
            .iter()
            .any(|p| *p == kitchen_id))
    })
    .await?;

    let mut config = serde_json::Map::new();
    config.insert("difficulty".into(), "easy".into());
    config.insert("rounds".into(), 10.into());
    let game = living
        .activities()
        .start(NewActivity {
            kind: "trivia".into(),
            device_ids: vec!["living-room".into(), "kitchen".into()],
            config,
            room_id: None,
        })
        .await?;
    println!("trivia {} is {}", game.id, game.state);
    until("every device acknowledged", || async {
        Ok(living.activities().get(&game.id).await?.state == "active")
    })
    .await?;
    println!("every device acknowledged: active");

    // Points for the kitchen, from both devices at once.
    let (a, b) = (living.activities(), kitchen.activities());
    let (id_a, id_b) = (game.id.clone(), game.id.clone());
    let (ra, rb) = tokio::join!(
        async move {
            for _ in 0..5 {
                a.score(&id_a, "kitchen", 1).await?;
            }
            anyhow::Ok(())
        },
        async move {
            for _ in 0..5 {
                b.score(&id_b, "kitchen", 2).await?;
            }
            anyhow::Ok(())
        }
    );
    ra?;
    rb?;
    until("both devices' points arrive", || async {
        Ok(living
            .activities()
            .get(&game.id)
            .await?
            .scores
            .get(&kitchen_id)
            == Some(&15))
    })
    .await?;
    living
        .activities()
        .act(&game.id, ActivityAction::Step)
        .await?;
    let ended = living
        .activities()
        .act(&game.id, ActivityAction::End)
        .await?;
    println!("final scores: {:?}", ended.final_scores.unwrap_or_default());

    // A session follows its user to the kitchen, with its context.
    let mut context = serde_json::Map::new();
    context.insert("question".into(), 7.into());
    let session = living
        .sessions()
        .start(NewSession {
            user: "ann".into(),
            persona: Some("quizmaster".into()),
            context,
        })
        .await?;
    let moved = living.sessions().handoff(&session.id, "kitchen").await?;
    println!(
        "session {} is now on {} (handoff {}), context {:?}",
        session.id,
        moved.session.device.unwrap_or_default(),
        moved.handoff.outcome,
        moved.session.context
    );

    kitchen.shutdown().await?;
    living.shutdown().await?;
    std::fs::remove_dir_all(&base)?;
    Ok(())
}
