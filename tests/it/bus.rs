//! The node's event bus through the library: changes written while a device was away
//! reach it by sync with their correlation id, and peers coming and going are events, on
//! the bus and on the typed stream it is fed from.

use std::time::Duration;

use hearth::bus::Pattern;
use hearth::{EntityWrite, Event, EventItem};
use tokio::time::timeout;

use crate::ws::{config, join_and_start, start, wait_admitted};

const T: Duration = Duration::from_secs(30);

fn write(state: &str, correlation_id: Option<&str>) -> EntityWrite {
    EntityWrite {
        state: state.into(),
        correlation_id: correlation_id.map(str::to_string),
        ..EntityWrite::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correlation_id_reaches_a_device_that_catches_up_by_sync() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let mut a_events = a.events();
    timeout(T, a.entities().set("light.porch", write("on", None)))
        .await
        .unwrap()
        .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    wait_admitted(&a, b.peer_id()).await;
    let b_peer = b.peer_id().to_string();
    // The network admits B a moment before A's core announces it on the bus.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let seen = a
            .bus()
            .history(&Pattern::parse("peer.connected").unwrap(), 10);
        if seen.iter().any(|e| e.subject == b_peer) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The bus is fed from the node's typed stream, which carried the arrival first.
    let arrived = loop {
        match timeout(T, a_events.next()).await.unwrap() {
            Some(EventItem::Event(Event::PeerConnected { peer, device_name }))
                if peer == b_peer =>
            {
                break device_name;
            }
            Some(_) => {}
            None => panic!("A stopped"),
        }
    };
    assert_eq!(arrived.as_deref(), Some("b"));
    let entity = b.bus().wait_for("entity.changed", T).unwrap();
    // B may already hold the entity from the join's first sync; a fresh write is certain.
    timeout(T, a.entities().set("light.porch", write("warm", None)))
        .await
        .unwrap()
        .unwrap();
    assert!(entity.await.is_some());

    // B goes away; A writes with a correlation id; the change can reach B only by the
    // sync exchange when it comes back, since nothing is pushed to an absent device.
    let left = a.bus().wait_for("peer.disconnected", T).unwrap();
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    let left = left.await.expect("no peer.disconnected on A");
    assert_eq!(left.subject, b_peer);
    timeout(
        T,
        a.entities()
            .set("light.porch", write("off", Some("away-7"))),
    )
    .await
    .unwrap()
    .unwrap();

    let b = timeout(T, hearth::Node::start(config(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    let event = loop {
        let found = b
            .bus()
            .history(&Pattern::parse("entity.changed").unwrap(), 100)
            .into_iter()
            .find(|e| e.data["state"] == "off");
        if let Some(e) = found {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "B never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event.correlation_id.as_deref(), Some("away-7"));
    assert_eq!(event.source.device, a.peer_id().as_str());
    assert_eq!(event.metadata["origin"], "remote");

    // A later write without an id is not credited with the earlier one.
    let next = b.bus().wait_for("entity.changed", T).unwrap();
    timeout(T, a.entities().set("light.porch", write("on", None)))
        .await
        .unwrap()
        .unwrap();
    let next = next.await.expect("no event for the next write");
    assert_eq!(next.data["state"], "on");
    assert_eq!(next.correlation_id, None);

    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}
