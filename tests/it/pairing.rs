//! Devices of one home pair through invite codes and keep their entities in sync; other
//! homes and unpaired devices get nothing.

use std::time::{Duration, Instant};

use hearth::{ApiConfig, Config, EntityWrite, Node};
use tokio::time::timeout;

pub(crate) const T: Duration = Duration::from_secs(30);

pub(crate) fn config(dir: &std::path::Path, name: &str) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        api: Some(ApiConfig::on("127.0.0.1:0".parse().unwrap())),
        device_name: Some(name.into()),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
        ..Config::default()
    }
}

pub(crate) fn write(state: &str) -> EntityWrite {
    EntityWrite {
        state: state.into(),
        ..EntityWrite::default()
    }
}

/// Polls `node` until entity `id` has `state`.
pub(crate) async fn wait_state(node: &Node, id: &str, state: &str) {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(Some(e)) = node.entities().get(id).await
            && e.state == state
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {state:?} on {}",
            node.device_name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn join_and_start(admin: &Node, dir: &std::path::Path, name: &str) -> Node {
    let invite = timeout(T, admin.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    let joined = timeout(T, Node::join(&invite.code, &config(dir, name)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(joined.home_id, admin.home_id());
    let node = timeout(T, Node::start(config(dir, name)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.home_id(), admin.home_id());
    assert_eq!(node.peer_id(), joined.peer_id);
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_pair_and_sync_entities_both_ways() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    timeout(T, a.entities().set("light.porch", write("on")))
        .await
        .unwrap()
        .unwrap();

    let b = join_and_start(&a, dirs[1].path(), "b").await;
    let c = join_and_start(&a, dirs[2].path(), "c").await;

    // What A held before they joined reaches both.
    wait_state(&b, "light.porch", "on").await;
    wait_state(&c, "light.porch", "on").await;

    // A new entity on A, and a write on B, reach every device.
    timeout(T, a.entities().set("sensor.door", write("open")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, "sensor.door", "open").await;
    wait_state(&c, "sensor.door", "open").await;
    timeout(T, b.entities().set("light.porch", write("off")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&a, "light.porch", "off").await;
    wait_state(&c, "light.porch", "off").await;

    for n in [a, b, c] {
        timeout(T, n.shutdown()).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_joined_reports_its_lag_until_it_is_in_sync() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    for id in ["light.porch", "light.hall", "sensor.door"] {
        timeout(T, a.entities().set(id, write("on")))
            .await
            .unwrap()
            .unwrap();
    }
    let alone = a.sync_lag().await.unwrap();
    assert!(alone.peers.is_empty(), "{alone:?}");
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    wait_state(&b, "sensor.door", "on").await;
    // The lag `hearth up` draws as its initial sync: it reaches zero with A.
    let deadline = Instant::now() + T;
    loop {
        let lag = b.sync_lag().await.unwrap();
        if let [(peer, 0)] = lag.peers.as_slice() {
            assert_eq!(peer, &a.peer_id().to_string());
            // The home's documents and the three entities' at least.
            assert!(lag.documents >= 4, "{lag:?}");
            break;
        }
        assert!(Instant::now() < deadline, "B never in sync: {lag:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in [a, b] {
        timeout(T, n.shutdown()).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_codes_are_refused_with_the_intended_message_and_change_nothing() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();

    // Garbage is not a code.
    let err = timeout(T, Node::join("hello world", &config(dirs[1].path(), "x")))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("not a Hearth invite code"),
        "{err}"
    );
    assert!(!dirs[1].path().join("store").exists());

    // A used code fails the second time.
    let invite = timeout(T, a.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    timeout(T, Node::join(&invite.code, &config(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    let err = timeout(T, Node::join(&invite.code, &config(dirs[2].path(), "c")))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
    assert!(!dirs[2].path().join("store").exists());

    // An expired code is refused before anything is sent.
    let invite = timeout(T, a.invite(Duration::from_secs(1)))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = timeout(T, Node::join(&invite.code, &config(dirs[3].path(), "d")))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    // A dir that already holds a home cannot join.
    let invite = timeout(T, a.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    let err = timeout(T, Node::join(&invite.code, &config(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("already holds a home"), "{err}");

    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_home_connects_but_receives_no_document() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let canary = "canary-5f1d0c";
    timeout(T, a.entities().set("lock.front_door", write(canary)))
        .await
        .unwrap()
        .unwrap();
    let addr = a.listen_addrs().await.unwrap().remove(0);

    let mut other = config(dirs[1].path(), "stranger");
    other.static_peers = vec![format!("{addr}/p2p/{}", a.peer_id())];
    let stranger = timeout(T, Node::start(other)).await.unwrap().unwrap();
    // The stranger dials, says hello and is refused, more than once: A's count of closed
    // connections moves (nothing else connects to A here).
    let api = a.api_addr().unwrap().to_string();
    let token = crate::ws::token(&a);
    let closed = move || {
        let (api, token) = (api.clone(), token.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let (status, text) = crate::util::http_get(&api, "/metrics", Some(&token));
                assert_eq!(status, 200, "{text}");
                text.lines()
                    // The histogram of connection lifetimes counts each closed one.
                    .filter(|l| l.contains("_swarm_connections_duration_seconds_count{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .await
            .unwrap()
        }
    };
    crate::sharing::until("A refuses the stranger twice", || {
        let closed = closed.clone();
        async move { closed().await >= 2.0 }
    })
    .await;
    assert!(stranger.entities().list().await.unwrap().is_empty());
    assert!(a.admitted_peers().await.unwrap().is_empty());
    timeout(T, stranger.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
    for entry in walk(dirs[1].path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "canary found in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_device_syncs_only_the_documents_that_changed() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    for i in 0..50 {
        timeout(T, a.entities().set(&format!("sensor.s{i}"), write("0")))
            .await
            .unwrap()
            .unwrap();
    }
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    for i in 0..50 {
        wait_state(&b, &format!("sensor.s{i}"), "0").await;
    }
    timeout(T, b.shutdown()).await.unwrap().unwrap();

    // While B is away, A makes 100 changes, all to 10 of the 50 entities.
    for round in 1..=10 {
        for i in 0..10 {
            timeout(
                T,
                a.entities()
                    .set(&format!("sensor.s{i}"), write(&round.to_string())),
            )
            .await
            .unwrap()
            .unwrap();
        }
    }

    let b = timeout(T, Node::start(config(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    for i in 0..10 {
        wait_state(&b, &format!("sensor.s{i}"), "10").await;
    }
    let counters = timeout(T, b.sync_counters()).await.unwrap().unwrap();
    assert_eq!(counters.reconciliations, 1, "{counters:?}");
    // The 10 changed entities needed a sync exchange; the other 40, and the home,
    // registry, presence and users documents, were found equal by the digest and sent
    // nothing.
    assert_eq!(counters.docs_synced, 10, "{counters:?}");
    assert_eq!(counters.docs_already_in_sync, 44, "{counters:?}");

    // Live pushes still reach B for an entity the digest found equal.
    timeout(T, a.entities().set("sensor.s40", write("live")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, "sensor.s40", "live").await;

    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_certificate_is_refused_and_the_home_keeps_syncing() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    let addr = a.listen_addrs().await.unwrap().remove(0);

    // A raw peer that presents certificate-shaped garbage and then pushes frames anyway.
    let forged: Vec<u8> = (0..300u32).map(|i| (i * 7 + 13) as u8).collect();
    let (net, _events, event_loop) = hearth_net::new(hearth_net::Config {
        listen: Vec::new(),
        mdns: false,
        static_peers: vec![format!("{addr}/p2p/{}", a.peer_id()).parse().unwrap()],
        certificate: forged,
        ..hearth_net::Config::default()
    })
    .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(event_loop.run(cancel.clone()));
    let a_peer: hearth_net::PeerId = a.peer_id().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let _ = net
            .send(a_peer, hearth_net::Bytes::from_static(b"\xff\x00garbage"))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Only B is admitted, and A still syncs with it.
    assert_eq!(
        a.admitted_peers().await.unwrap(),
        vec![b.peer_id().to_string()]
    );
    timeout(T, a.entities().set("light.hall", write("on")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, "light.hall", "on").await;

    cancel.cancel();
    let _ = task.await;
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}
