//! Generations on real nodes: the admin device cuts an entity past its threshold, the
//! other device moves, a write made on the old generation while it could not hear the
//! cut is carried over, old generations are deleted once both devices moved, history
//! runs on across cuts, and all of it holds across a restart; and all of it again with a
//! documents cache so small that generations are unloaded between uses.

use std::time::{Duration, Instant};

use hearth::{Config, HistoryConfig, Node};
use tokio::time::timeout;

use crate::pairing::{T, config, wait_state, write};

fn small(dir: &std::path::Path, name: &str) -> Config {
    Config {
        history: HistoryConfig {
            cut_changes: 20,
            cut_bytes: 1 << 20,
            keep_versions: 20,
            keep_days: 30,
        },
        ..config(dir, name)
    }
}

async fn join(admin: &Node, dir: &std::path::Path, name: &str) -> Node {
    let invite = timeout(T, admin.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    timeout(T, Node::join(&invite.code, &small(dir, name)))
        .await
        .unwrap()
        .unwrap();
    timeout(T, Node::start(small(dir, name)))
        .await
        .unwrap()
        .unwrap()
}

async fn set(node: &Node, id: &str, state: &str) {
    timeout(T, node.entities().set(id, write(state)))
        .await
        .unwrap()
        .unwrap();
}

/// Polls until `f` holds for `node`'s storage of `id`.
async fn wait_storage(
    node: &Node,
    id: &str,
    what: &str,
    f: impl Fn(&hearth::EntityStorage) -> bool,
) {
    let deadline = Instant::now() + T;
    loop {
        let s = node.entities().storage(id).await;
        if let Ok(s) = &s
            && f(s)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} on {}: never {what}; last {s:?}",
            node.device_name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_is_cut_moved_carried_and_its_old_generations_deleted() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(small(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let b = join(&a, dirs[1].path(), "b").await;
    let id = "sensor.temperature";

    // Past 20 changes, A (the admin) cuts; B follows and still shows every write.
    for i in 0..30 {
        set(&a, id, &format!("{i}")).await;
    }
    wait_state(&b, id, "29").await;
    wait_storage(&a, id, "cut", |s| s.generation >= 1).await;
    wait_storage(&b, id, "moved", |s| s.generation >= 1).await;
    // B writes on whatever generation it is on; A sees it.
    set(&b, id, "from-b").await;
    wait_state(&a, id, "from-b").await;

    // B stops hearing A. A cuts again meanwhile; B writes on the generation A cut off.
    let before = a.entities().storage(id).await.unwrap().generation;
    b.debug_stall_network_reads(true);
    let mut n = 0;
    while a.entities().storage(id).await.unwrap().generation == before {
        set(&a, id, &format!("a-{n}")).await;
        n += 1;
        assert!(n < 100, "A never cut");
    }
    let on_b = b.entities().storage(id).await.unwrap().generation;
    assert_eq!(on_b, before, "B heard the cut while it was not reading");
    tokio::time::sleep(Duration::from_millis(20)).await;
    set(&b, id, "late-from-b").await;
    // A receives B's write on the old generation and carries it into the new one.
    wait_state(&a, id, "late-from-b").await;
    b.debug_stall_network_reads(false);
    wait_state(&b, id, "late-from-b").await;
    wait_storage(&b, id, "moved on", |s| s.generation > before).await;

    // Many more writes: generations come and go, and what each device holds stays bounded.
    for i in 0..200 {
        set(if i % 3 == 0 { &b } else { &a }, id, &format!("bulk-{i}")).await;
    }
    wait_state(&b, id, "bulk-199").await;
    wait_state(&a, id, "bulk-199").await;
    for node in [&a, &b] {
        wait_storage(node, id, "bounded", |s| {
            s.generations_held <= 3 && s.changes <= 80
        })
        .await;
    }
    let s = a.entities().storage(id).await.unwrap();
    assert!(s.generation >= 8, "{s:?}");
    // History runs on across the cut: the newest 20 versions are there.
    let history = timeout(T, a.entities().history(id, 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(history.len(), 20);
    // A version from before the newest cut can still be restored, when it is held.
    let oldest = &history[0].version;
    timeout(T, a.entities().restore(id, oldest))
        .await
        .unwrap()
        .unwrap();

    // After a restart B still holds the entity and follows the next cuts.
    let shown = a.entities().get(id).await.unwrap().unwrap().state;
    wait_state(&b, id, &shown).await;
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    let b = timeout(T, Node::start(small(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, id, &shown).await;
    for i in 0..40 {
        set(&a, id, &format!("after-{i}")).await;
    }
    wait_state(&b, id, "after-39").await;
    let on_a = a.entities().storage(id).await.unwrap();
    wait_storage(&b, id, "on A's generation", |s| {
        s.generation == on_a.generation
    })
    .await;

    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

/// Filler entities that push the heavy one's generations out of a 1 MiB cache.
const FILLER: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_cut_moved_and_deleted_while_their_documents_are_unloaded() {
    let tiny = |dir: &std::path::Path, name: &str| Config {
        documents_cache_mib: 1,
        ..small(dir, name)
    };
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(tiny(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let invite = timeout(T, a.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    timeout(T, Node::join(&invite.code, &tiny(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    let b = timeout(T, Node::start(tiny(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    let id = "sensor.power";
    let fill = |round: usize| -> Vec<(hearth::EntityId, hearth::EntityWrite)> {
        (0..FILLER)
            .map(|i| {
                (
                    format!("sensor.fill_{i}").into(),
                    write(&format!("{round}")),
                )
            })
            .collect()
    };
    // Every few writes to the heavy entity, the filler goes round once: the heavy
    // entity's current and old generations drop out of the cache between cuts.
    for i in 0..90 {
        set(&a, id, &format!("{i}")).await;
        if i % 15 == 14 {
            timeout(T, a.entities().set_many(fill(i)))
                .await
                .unwrap()
                .unwrap();
        }
    }
    wait_state(&b, id, "89").await;
    for node in [&a, &b] {
        let c = timeout(T, node.sync_counters()).await.unwrap().unwrap();
        assert!(c.documents_evicted > 0, "{}: {c:?}", node.device_name());
    }
    wait_storage(&a, id, "cut", |s| s.generation >= 3).await;
    let on_a = a.entities().storage(id).await.unwrap();
    wait_storage(&b, id, "moved to A's generation", |s| {
        s.generation == on_a.generation
    })
    .await;
    for node in [&a, &b] {
        wait_storage(node, id, "bounded", |s| s.generations_held <= 3).await;
    }
    // History runs on across generations loaded again for it.
    let history = timeout(T, a.entities().history(id, 30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(history.len(), 30);

    // After a restart (documents start unloaded) each device finds the same generations
    // from its meta records, without loading any, and keeps cutting and deleting.
    let held: Vec<usize> = {
        let mut v = Vec::new();
        for node in [&a, &b] {
            v.push(node.entities().storage(id).await.unwrap().generations_held);
        }
        v
    };
    // One at a time, so that the one restarted dials the other where it listens.
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    let b = timeout(T, Node::start(tiny(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    // A comes back where B dials it.
    let listen = a.listen_addrs().await.unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
    let a = timeout(
        T,
        Node::start(Config {
            listen,
            ..tiny(dirs[0].path(), "a")
        }),
    )
    .await
    .unwrap()
    .unwrap();
    for (node, held) in [(&a, held[0]), (&b, held[1])] {
        let s = node.entities().storage(id).await.unwrap();
        // A deleted generation's meta record went with it: it is not held again.
        assert!(
            s.generations_held <= held,
            "{}: {s:?}, held {held} before",
            node.device_name()
        );
    }
    let b_peer = b.peer_id().clone();
    let deadline = Instant::now() + T;
    while !a.admitted_peers().await.unwrap().contains(&b_peer) {
        assert!(Instant::now() < deadline, "A never reconnected to B");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..60 {
        set(&b, id, &format!("again-{i}")).await;
        if i % 20 == 19 {
            timeout(T, b.entities().set_many(fill(1000 + i)))
                .await
                .unwrap()
                .unwrap();
        }
    }
    wait_state(&a, id, "again-59").await;
    wait_storage(&a, id, "cut again", |s| s.generation > on_a.generation).await;
    let on_a = a.entities().storage(id).await.unwrap();
    wait_storage(&b, id, "moved again", |s| s.generation == on_a.generation).await;
    for node in [&a, &b] {
        wait_storage(node, id, "bounded after the restart", |s| {
            s.generations_held <= 3
        })
        .await;
        assert_eq!(
            node.entities().get(id).await.unwrap().unwrap().state,
            "again-59"
        );
    }
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_cut_while_unshared_and_shared_again_is_current_in_the_other_home() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(small(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let b = timeout(T, Node::start(small(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    let id = "light.porch";
    set(&a, id, "0").await;
    crate::sharing::pair(&a, &b).await;
    let share = |node: &Node| {
        let shares = node.shares();
        let home = b.home_id().clone();
        async move {
            timeout(T, shares.share(id, &home, hearth::Rights::Write, None))
                .await
                .unwrap()
                .unwrap()
        }
    };
    share(&a).await;
    wait_state(&b, id, "0").await;

    // Unshared, the entity is cut like any other; shared again, the grant names the new
    // generation, which B reads and writes from then on.
    timeout(T, a.shares().unshare(id, b.home_id()))
        .await
        .unwrap()
        .unwrap();
    let mut n = 0;
    while a.entities().storage(id).await.unwrap().generation == 0 {
        set(&a, id, &format!("unshared-{n}")).await;
        n += 1;
        assert!(n < 100, "A never cut");
    }
    share(&a).await;
    set(&a, id, "shared-again").await;
    wait_state(&b, id, "shared-again").await;
    set(&b, id, "from-b").await;
    wait_state(&a, id, "from-b").await;

    // After a restart B still reads the generation in force.
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    let b = timeout(T, Node::start(small(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.entities().get(id).await.unwrap().unwrap().state, "from-b");
    set(&a, id, "after-restart").await;
    wait_state(&b, id, "after-restart").await;
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}
