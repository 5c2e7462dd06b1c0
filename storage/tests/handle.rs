//! The async handle over the real sled backend: concurrent writers, and close.

use std::time::Duration;

use hearth_storage::{Batch, Error, KeySource, Keyspace, Options, Scan, open_with};

const WRITERS: u32 = 16;
const WRITES_EACH: u32 = 40;

fn options() -> Options {
    Options {
        cache_capacity: 4 << 20,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_all_acknowledged_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..WRITES_EACH {
                let key = format!("w{writer:02}-{i:04}");
                if i % 4 == 0 {
                    let mut batch = Batch::new();
                    batch.put(Keyspace::Outbox, key.as_bytes(), key.as_bytes());
                    batch.put(Keyspace::Audit, key.as_bytes(), key.as_bytes());
                    store.batch(batch).await?;
                } else {
                    store
                        .put(Keyspace::Outbox, key.as_bytes(), key.as_bytes())
                        .await?;
                }
            }
            Ok::<_, Error>(())
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("writers finished")
            .unwrap()
            .unwrap();
    }
    store.close().await.unwrap();

    // Everything acknowledged is there after a reopen.
    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    let outbox = store
        .scan(Keyspace::Outbox, Scan::all().limit(10_000))
        .await
        .unwrap();
    assert_eq!(outbox.len(), (WRITERS * WRITES_EACH) as usize);
    assert!(outbox.iter().all(|(k, v)| k == v));
    let audit = store
        .scan(Keyspace::Audit, Scan::all().limit(10_000))
        .await
        .unwrap();
    assert_eq!(audit.len(), (WRITERS * WRITES_EACH / 4) as usize);
    store.close().await.unwrap();
}

#[tokio::test]
async fn close_flushes_and_releases_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    let clone = store.clone();
    store
        .put(Keyspace::Meta, "device.name", "hall")
        .await
        .unwrap();
    store.close().await.unwrap();
    assert!(matches!(
        clone.get(Keyspace::Meta, "device.name").await,
        Err(Error::Closed)
    ));

    // The database lock is released as close returns, and the data is there.
    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    assert_eq!(
        store
            .get(Keyspace::Meta, "device.name")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"hall"[..])
    );
    store.close().await.unwrap();
}
