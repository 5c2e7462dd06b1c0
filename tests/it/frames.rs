//! Entities larger than one frame reach a device that joins later: a catch-up over the
//! sync stream's 4 MiB frame cap goes as several capped sync messages. What is refused
//! for size is counted in `hearth_sync_errors_total{kind="oversized"}`.

use std::time::{Duration, Instant};

use hearth::{EntityWrite, MAX_ATTRIBUTES_BYTES, Node};
use serde_json::{Map, Value, json};
use tokio::time::timeout;

use crate::pairing::{T, config, join_and_start, wait_state, write};
use crate::util::http_get;

/// Catch-up of several megabytes in a debug build, on shared cores, takes a while.
const BIG: Duration = Duration::from_secs(120);
/// The API's body cap, which every write of the many-writes entity stays under.
const API_BODY_CAP: usize = 256 * 1024;

/// `len` printable ASCII characters (no quote or backslash, so JSON adds nothing) from a
/// simple generator: noise that Automerge's deflated columns cannot shrink below the cap.
fn noise(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] =
        b"!#$%&()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~ ";
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(ALPHABET[(x % ALPHABET.len() as u64) as usize])
        })
        .collect()
}

fn attributes(value: Value) -> Option<Map<String, Value>> {
    match value {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Polls until `node` holds entity `id` with exactly `want`'s state and attributes.
async fn wait_entity(node: &Node, id: &str, want: &hearth::Entity) {
    let deadline = Instant::now() + BIG;
    loop {
        if let Ok(Some(e)) = timeout(T, node.entities().get(id)).await.unwrap()
            && e.state == want.state
            && e.attributes == want.attributes
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never arrived whole on {}",
            node.device_name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `hearth_sync_errors_total{kind="oversized"}` as `node` serves it on `/metrics`.
async fn oversized_metric(node: &Node, dir: &std::path::Path) -> u64 {
    let api = node.api_addr().unwrap().to_string();
    let token = hearth::read_token(dir).unwrap().unwrap();
    let (status, text) = timeout(
        T,
        tokio::task::spawn_blocking(move || http_get(&api, "/metrics", Some(&token))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("hearth_sync_errors_total{kind=\"oversized\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no oversized series in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_larger_than_a_frame_reach_a_device_that_joins_later() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    timeout(T, a.entities().set("light.porch", write("on")))
        .await
        .unwrap()
        .unwrap();

    // 24 writes of about 240 KB each, every one a request the API would take: over
    // 5 MB of history, more than a frame holds even with Automerge's compression.
    for i in 0..24u64 {
        let attrs = json!({ "frame": noise(i + 1, 240_000), "n": i });
        let body = json!({ "state": "recording", "attributes": attrs }).to_string();
        assert!(body.len() < API_BODY_CAP, "{} bytes", body.len());
        let w = EntityWrite {
            state: "recording".into(),
            attributes: attributes(attrs),
            correlation_id: None,
        };
        timeout(T, a.entities().set("camera.big", w))
            .await
            .unwrap()
            .unwrap();
    }
    // One write as large as a write may be.
    let one = json!({ "frame": "" }).to_string().len();
    let w = EntityWrite {
        state: "still".into(),
        attributes: attributes(json!({ "frame": noise(99, MAX_ATTRIBUTES_BYTES - one) })),
        correlation_id: None,
    };
    timeout(T, a.entities().set("camera.single", w))
        .await
        .unwrap()
        .unwrap();
    let big = a.entities().get("camera.big").await.unwrap().unwrap();
    let single = a.entities().get("camera.single").await.unwrap().unwrap();

    let b = join_and_start(&a, dirs[1].path(), "b").await;
    wait_state(&b, "light.porch", "on").await;
    wait_entity(&b, "camera.single", &single).await;
    wait_entity(&b, "camera.big", &big).await;

    // Nothing was refused for size on either side on the way.
    for (n, dir) in [(&a, dirs[0].path()), (&b, dirs[1].path())] {
        assert_eq!(n.sync_counters().await.unwrap().frames_oversized, 0);
        assert_eq!(oversized_metric(n, dir).await, 0);
    }

    // The devices stay in step: a write after the catch-up arrives as usual.
    timeout(T, a.entities().set("camera.big", write("idle")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, "camera.big", "idle").await;

    for n in [a, b] {
        timeout(T, n.shutdown()).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_message_over_the_cap_is_counted_as_oversized() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    timeout(T, a.entities().set("light.porch", write("on")))
        .await
        .unwrap()
        .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    wait_state(&b, "light.porch", "on").await;
    assert_eq!(oversized_metric(&a, dirs[0].path()).await, 0);

    // A sync payload that fits a frame once sealed, but is over the sync message cap
    // both devices hold (the frame cap less envelope, seal and margin): B's transport
    // carries it, A's engine refuses it before decoding, and says so in the metric.
    let payload = vec![0x42; hearth_net::MAX_FRAME_SIZE - 8 * 1024];
    let frame = timeout(T, b.debug_seal_sync("light.porch", payload))
        .await
        .unwrap()
        .unwrap();
    assert!(frame.len() <= hearth_net::MAX_FRAME_SIZE);
    timeout(T, b.debug_send_raw(a.peer_id(), false, frame))
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + T;
    while oversized_metric(&a, dirs[0].path()).await == 0 {
        assert!(Instant::now() < deadline, "the refusal was never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A keeps serving B.
    timeout(T, a.entities().set("light.porch", write("off")))
        .await
        .unwrap()
        .unwrap();
    wait_state(&b, "light.porch", "off").await;
    for n in [a, b] {
        timeout(T, n.shutdown()).await.unwrap().unwrap();
    }
}
