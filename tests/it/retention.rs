//! What goes when it is no longer needed: saved sync states of a deleted entity.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hearth::EntityWrite;
use tokio::time::timeout;

use crate::ws::{join_and_start, start, wait_admitted};

const T: Duration = Duration::from_secs(30);

/// The saved sync states in a stopped node's store, as (peer, doc) keys.
async fn sync_state_keys(dir: &Path) -> BTreeSet<Vec<u8>> {
    let dir = dir.to_path_buf();
    let store = tokio::task::spawn_blocking(move || {
        hearth_storage::open(&dir, hearth_storage::KeySource::KeyFile)
    })
    .await
    .unwrap()
    .unwrap();
    let keys = timeout(
        T,
        store.scan(
            hearth_storage::Keyspace::SyncStates,
            hearth_storage::Scan::all(),
        ),
    )
    .await
    .unwrap()
    .unwrap()
    .into_iter()
    .map(|(k, _)| k)
    .collect();
    timeout(T, store.close()).await.unwrap().unwrap();
    keys
}

fn doc_of(key: &[u8]) -> Vec<u8> {
    key[key.len() - 16..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_entity_deletes_its_saved_sync_states() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    wait_admitted(&a, b.peer_id()).await;
    for id in ["light.x", "light.keep"] {
        let write = EntityWrite {
            state: "on".into(),
            ..EntityWrite::default()
        };
        timeout(T, a.entities().set(id, write))
            .await
            .unwrap()
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + T;
    for id in ["light.x", "light.keep"] {
        while b.entities().get(id).await.unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never reached B"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // B writes both back, so A holds a sync session with B for each (a new document
    // reaches a peer whole, and its session would otherwise start only at the first
    // confirmation round, which a loaded machine can push past B's leaving).
    for id in ["light.x", "light.keep"] {
        let write = EntityWrite {
            state: "off".into(),
            ..EntityWrite::default()
        };
        timeout(T, b.entities().set(id, write))
            .await
            .unwrap()
            .unwrap();
        while a.entities().get(id).await.unwrap().map(|e| e.state) != Some("off".into()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} from B never reached A"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // B leaves: A keeps its sessions' states for a resume.
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    while !a.admitted_peers().await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never saw B leave"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a_dir = a.data_dir().to_path_buf();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
    let before = sync_state_keys(&a_dir).await;
    let docs_before: BTreeSet<Vec<u8>> = before.iter().map(|k| doc_of(k)).collect();
    // At least both entities (and whichever home-wide documents had a session).
    assert!(
        docs_before.len() >= 2,
        "{} documents with saved states",
        docs_before.len()
    );

    let a = start(&a_dir, "a").await;
    timeout(T, a.entities().delete("light.x"))
        .await
        .unwrap()
        .unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
    let after = sync_state_keys(&a_dir).await;
    let docs_after: BTreeSet<Vec<u8>> = after.iter().map(|k| doc_of(k)).collect();
    let gone: Vec<_> = docs_before.difference(&docs_after).collect();
    assert_eq!(gone.len(), 1, "the deleted entity's states stay");
    assert!(after.is_subset(&before), "other states changed");
    assert_eq!(
        before.len() - after.len(),
        before
            .iter()
            .filter(|k| &&doc_of(k) == gone.first().unwrap())
            .count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_keeps_its_newest_messages_and_still_announces_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::ws::config(dir.path(), "a");
    config.chat_max_messages = 5;
    let node = timeout(T, hearth::Node::start(config))
        .await
        .unwrap()
        .unwrap();
    let room = timeout(T, node.rooms().create("den", None, None))
        .await
        .unwrap()
        .unwrap();
    let mut events = node.events();
    for i in 0..8 {
        timeout(T, node.rooms().say(&room.room_id, None, &format!("m{i}")))
            .await
            .unwrap()
            .unwrap();
    }
    let kept: Vec<String> = timeout(T, node.rooms().messages(&room.room_id, 100))
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|m| m.message)
        .collect();
    assert_eq!(kept, ["m3", "m4", "m5", "m6", "m7"]);
    // Pruning takes messages off the front as new ones come: every new one is still
    // announced once, in order.
    let mut announced = Vec::new();
    while announced.len() < 8 {
        match timeout(T, events.next()).await.unwrap().unwrap() {
            hearth::EventItem::Event(hearth::Event::Chat { message, .. }) => {
                announced.push(message.message.clone())
            }
            hearth::EventItem::Missed(n) => panic!("missed {n} events"),
            _ => {}
        }
    }
    let want: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    assert_eq!(announced, want);
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}
