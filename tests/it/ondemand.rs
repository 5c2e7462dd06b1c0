//! Documents on demand between two devices: under a budget that holds about half of them,
//! entity documents are unloaded once stored and load again for a peer's push, a reconnect's
//! sync, a read, a write and a history read, with nothing lost across a restart.

use std::time::Duration;

use hearth::{Config, EntityWrite, Node};
use tokio::time::timeout;

use crate::pairing::{T, config, wait_state, write};
use crate::sharing::{init_tracing, until};

/// Entities written; at 1 MiB the cache holds about 60 of them.
const N: usize = 120;

fn small(dir: &std::path::Path, name: &str) -> Config {
    Config {
        documents_cache_mib: 1,
        ..config(dir, name)
    }
}

async fn counters(node: &Node) -> hearth::SyncCounters {
    timeout(T, node.sync_counters()).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_documents_load_again_for_sync_reads_writes_and_history() {
    init_tracing();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = timeout(T, Node::start(small(da.path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let invite = timeout(T, a.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    timeout(T, Node::join(&invite.code, &small(db.path(), "b")))
        .await
        .unwrap()
        .unwrap();
    let b = timeout(T, Node::start(small(db.path(), "b")))
        .await
        .unwrap()
        .unwrap();

    let writes: Vec<(hearth::EntityId, EntityWrite)> = (0..N)
        .map(|i| (format!("sensor.{i}").into(), write("v0")))
        .collect();
    timeout(T, a.entities().set_many(writes))
        .await
        .unwrap()
        .unwrap();
    for i in 0..N {
        wait_state(&b, &format!("sensor.{i}"), "v0").await;
    }
    // Both devices unload documents once their sessions are idle and chunks stored.
    for node in [&a, &b] {
        until("documents evicted", || async {
            let c = counters(node).await;
            c.documents_evicted > 0 && (c.documents_loaded as usize) < N
        })
        .await;
    }

    // A's oldest document was evicted: the write loads it, and B's copy, evicted too
    // after B read the rest, loads for the push. B unloads it once its session is idle.
    until("sensor.0 unloaded on b", || async {
        for i in 1..N {
            timeout(T, b.entities().get(format!("sensor.{i}")))
                .await
                .unwrap()
                .unwrap();
        }
        b.debug_document_loaded("sensor.0").await.unwrap() == Some(false)
    })
    .await;
    let b_loads = counters(&b).await.documents_loads;
    timeout(T, a.entities().set("sensor.0", write("v1")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, "sensor.0", "v1").await;
    assert!(
        counters(&b).await.documents_loads > b_loads,
        "the push loaded it on b"
    );

    // A history read of a document evicted again.
    for i in 1..N {
        timeout(T, a.entities().get(format!("sensor.{i}")))
            .await
            .unwrap()
            .unwrap();
    }
    let versions = timeout(T, a.entities().history("sensor.0", 10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");

    // B goes away, A writes, and B's reconnect syncs the documents that differ, loading
    // them; the rest stay unloaded and attached in sync.
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.entities().set("sensor.5", write("v2")))
        .await
        .unwrap()
        .unwrap();
    let b = timeout(T, Node::start(small(db.path(), "b")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, "sensor.5", "v2").await;
    wait_state(&b, "sensor.0", "v1").await;
    wait_state(&b, "sensor.77", "v0").await;
    until("the same heads on both", || async {
        counters(&a).await.heads_root == counters(&b).await.heads_root
    })
    .await;
    assert!((counters(&b).await.documents_loaded as usize) < N);
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}
