//! Batch writes and the batching window: many writes acknowledged together after one
//! flush, pushed to peers as they commit, and durable once acknowledged.

use std::time::Duration;

use hearth::{Config, EntityWrite, Node};
use tokio::time::timeout;

use crate::pairing::{T, config, join_and_start, wait_state, write};

fn windowed(dir: &std::path::Path, name: &str, window: Duration) -> Config {
    Config {
        batch_window: window,
        ..config(dir, name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_writes_reaches_a_peer_and_survives_restart() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = timeout(
        T,
        Node::start(windowed(dirs[0].path(), "a", Duration::from_millis(5))),
    )
    .await
    .unwrap()
    .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    // Wait until B is admitted, so the batch is pushed rather than synced later.
    timeout(T, async {
        while a.admitted_peers().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();

    // 3 entities, 100 updates each, interleaved: new entities and updates in one batch.
    let writes: Vec<(hearth::EntityId, EntityWrite)> = (0..300)
        .map(|i| {
            (
                format!("sensor.s{}", i % 3).into(),
                write(&format!("v{}", i / 3)),
            )
        })
        .collect();
    let written = timeout(T, a.entities().set_many(writes))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(written.len(), 300);
    assert_eq!(
        (written[0].id.as_str(), written[0].state.as_str()),
        ("sensor.s0", "v0")
    );
    assert_eq!(
        (written[299].id.as_str(), written[299].state.as_str()),
        ("sensor.s2", "v99")
    );
    for i in 0..3 {
        wait_state(&b, &format!("sensor.s{i}"), "v99").await;
        let on_a = a.entities().get(&format!("sensor.s{i}")).await.unwrap();
        let on_b = b.entities().get(&format!("sensor.s{i}")).await.unwrap();
        assert_eq!(on_a.map(|e| e.version), on_b.map(|e| e.version));
    }

    // A single write in a window is acknowledged too (the window closes on its own).
    let one = timeout(T, a.entities().set("sensor.s0", write("last")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.state, "last");

    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    let a = timeout(
        T,
        Node::start(windowed(dirs[0].path(), "a", Duration::ZERO)),
    )
    .await
    .unwrap()
    .unwrap();
    let e = a.entities();
    assert_eq!(e.get("sensor.s0").await.unwrap().unwrap().state, "last");
    assert_eq!(e.get("sensor.s2").await.unwrap().unwrap().state, "v99");
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_bad_write_applies_none_and_oversized_batches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = timeout(T, Node::start(config(dir.path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let e = a.entities();
    let err = e
        .set_many(vec![
            ("light.ok".into(), write("on")),
            ("Not An Id".into(), write("on")),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid entity id"), "{err}");
    assert_eq!(e.get("light.ok").await.unwrap(), None);

    let too_many = vec![("light.ok".into(), write("on")); hearth::MAX_BATCH_WRITES + 1];
    let err = e.set_many(too_many).await.unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    assert!(e.set_many(Vec::new()).await.unwrap().is_empty());

    let err = Node::start(Config {
        batch_window: Duration::from_secs(5),
        ..config(tempfile::tempdir().unwrap().path(), "x")
    })
    .await
    .err()
    .expect("a 5 s window is refused");
    assert!(err.to_string().contains("batch window"), "{err}");
    a.shutdown().await.unwrap();
}
