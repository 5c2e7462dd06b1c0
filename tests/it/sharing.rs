//! Sharing between homes, in process on loopback with mDNS off: pairing homes, sharing
//! and unsharing entities, read-only grants, what never leaves a home, and the audit log.

use std::time::{Duration, Instant};

use hearth::{Error, Node};
use tokio::time::timeout;

use crate::pairing::{T, config, wait_state, write};

pub(crate) async fn start(dir: &std::path::Path, name: &str) -> Node {
    timeout(T, Node::start(config(dir, name)))
        .await
        .unwrap()
        .unwrap()
}

/// Pairs `joiner`'s home with `issuer`'s through a home code, and waits until each admits
/// the other's device.
pub(crate) async fn pair(issuer: &Node, joiner: &Node) {
    let code = timeout(T, issuer.invite_home(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    let paired = timeout(T, joiner.shares().pair(&code.code))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(paired.home_id, issuer.home_id());
    let homes = issuer.shares().homes().await.unwrap();
    assert!(homes.iter().any(|h| h.home_id == joiner.home_id()));
}

/// Polls until `f` holds, or fails naming `what`.
pub(crate) async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paired_homes_share_an_entity_and_write_it_both_ways() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.porch", write("off")).await.unwrap();
    pair(&a, &b).await;

    let mut events = b.events();
    let out = a
        .shares()
        .share("light.porch", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    assert_eq!(out.rights, hearth::Rights::Write);
    wait_state(&b, "light.porch", "off").await;
    let granted = timeout(T, async {
        loop {
            if let Some(hearth::EventItem::Event(e)) = events.next().await
                && e.name() == "share.granted"
            {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(granted.subject(), "light.porch");
    let seen = b.entities().get("light.porch").await.unwrap().unwrap();
    assert_eq!(seen.owner, a.home_id());

    a.entities().set("light.porch", write("on")).await.unwrap();
    wait_state(&b, "light.porch", "on").await;
    b.entities().set("light.porch", write("dim")).await.unwrap();
    wait_state(&a, "light.porch", "dim").await;

    let listed = b.shares().list().await.unwrap();
    assert_eq!(listed.shared_in.len(), 1);
    assert_eq!(listed.shared_in[0].entity_id, "light.porch");
    assert_eq!(listed.shared_in[0].owner, a.home_id());
    let listed = a.shares().list().await.unwrap();
    assert_eq!(listed.shared_out.len(), 1);
    assert_eq!(listed.shared_out[0].home, b.home_id());

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_grant_refuses_writes_at_both_ends() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.porch", write("off")).await.unwrap();
    pair(&a, &b).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Read, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "off").await;
    let refused = b.entities().set("light.porch", write("on")).await;
    assert!(matches!(refused, Err(Error::Forbidden(_))), "{refused:?}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unshared_home_reads_nothing_new_and_its_requests_are_refused() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    let c = start(dirs[2].path(), "c").await;
    a.entities().set("light.porch", write("0")).await.unwrap();
    // Still shared with B after the unshare: a write to it after the others is the
    // barrier that shows they would have reached B by then.
    a.entities()
        .set("light.sentinel", write("0"))
        .await
        .unwrap();
    pair(&a, &b).await;
    pair(&a, &c).await;
    for home in [b.home_id(), c.home_id()] {
        a.shares()
            .share("light.porch", home, hearth::Rights::Write, None)
            .await
            .unwrap();
    }
    a.shares()
        .share("light.sentinel", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    wait_state(&b, "light.sentinel", "0").await;
    wait_state(&b, "light.porch", "0").await;
    wait_state(&c, "light.porch", "0").await;

    let started = Instant::now();
    let out = a
        .shares()
        .unshare("light.porch", b.home_id())
        .await
        .unwrap();
    assert!(out.epoch.starts_with("0000000000000001-"), "{}", out.epoch);
    for i in 1..=100 {
        a.entities()
            .set("light.porch", write(&format!("after-{i}")))
            .await
            .unwrap();
    }
    wait_state(&c, "light.porch", "after-100").await;
    eprintln!(
        "unshare, 100 writes, third home current: {:?}",
        started.elapsed()
    );
    // B keeps what it had and nothing written after: A's frames to B go in order, so
    // once a later write of the still-shared sentinel arrived, none of those will.
    a.entities()
        .set("light.sentinel", write("after"))
        .await
        .unwrap();
    wait_state(&b, "light.sentinel", "after").await;
    let kept = b.entities().get("light.porch").await.unwrap().unwrap();
    assert_eq!(kept.state, "0");
    let listed = b.shares().list().await.unwrap();
    let porch = listed
        .shared_in
        .iter()
        .find(|s| s.entity_id == "light.porch");
    assert!(porch.unwrap().revoked);

    let audit = a
        .shares()
        .audit(hearth::Timestamp::from_unix_ms(0))
        .await
        .unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    let pos = |what: &str| actions.iter().position(|a| *a == what);
    assert!(pos("home.paired") < pos("share.granted"), "{actions:?}");
    assert!(pos("share.granted") < pos("share.revoked"), "{actions:?}");
    assert!(pos("share.revoked") < pos("key.rotated"), "{actions:?}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

/// Whether any captured frame, as received or as opened, holds `needle`.
fn captured_holds(captured: &[hearth::Captured], needle: &[u8]) -> bool {
    let holds = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    captured
        .iter()
        .any(|c| holds(&c.raw) || c.opened.as_deref().is_some_and(holds))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_shared_entities_leave_the_home() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    let canary = |i: usize| format!("canary-{i}-3f9a1c");
    for i in 0..20 {
        a.entities()
            .set(&format!("sensor.s{i}"), write(&canary(i)))
            .await
            .unwrap();
    }
    let captured = b.debug_capture().await.unwrap();
    pair(&a, &b).await;
    for i in [3, 11] {
        a.shares()
            .share(
                &format!("sensor.s{i}"),
                b.home_id(),
                hearth::Rights::Read,
                None,
            )
            .await
            .unwrap();
    }
    wait_state(&b, "sensor.s3", &canary(3)).await;
    wait_state(&b, "sensor.s11", &canary(11)).await;
    // Updates to every entity while the homes stay connected.
    for i in 0..20 {
        a.entities()
            .set(
                &format!("sensor.s{i}"),
                write(&format!("{}-again", canary(i))),
            )
            .await
            .unwrap();
    }
    wait_state(&b, "sensor.s11", &format!("{}-again", canary(11))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let listed: Vec<String> = b
        .entities()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.into_string())
        .collect();
    assert_eq!(listed, ["sensor.s11", "sensor.s3"]);
    let captured = captured.lock().unwrap().clone();
    assert!(
        captured.iter().any(|c| c.opened.is_some()),
        "nothing was captured"
    );
    assert!(captured_holds(&captured, canary(3).as_bytes()));
    for i in (0..20).filter(|i| *i != 3 && *i != 11) {
        assert!(
            !captured_holds(&captured, canary(i).as_bytes()),
            "canary {i} reached the other home"
        );
        let id = format!("sensor.s{i}");
        assert!(
            b.entities().get(&id).await.unwrap().is_none(),
            "{id} is readable on the other home"
        );
    }
    b.shutdown().await.unwrap();
    // B's store, reopened: still only the two shared entities.
    let b = start(dirs[1].path(), "b").await;
    assert_eq!(b.entities().list().await.unwrap().len(), 2);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_home_cannot_open_frames_meant_for_another() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    let c = start(dirs[2].path(), "c").await;
    a.entities().set("light.porch", write("off")).await.unwrap();
    let captured = b.debug_capture().await.unwrap();
    pair(&a, &b).await;
    pair(&a, &c).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "off").await;
    a.entities().set("light.porch", write("on")).await.unwrap();
    wait_state(&b, "light.porch", "on").await;

    let frames: Vec<Vec<u8>> = captured
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.peer == a.peer_id().as_str() && c.opened.is_some())
        .map(|c| c.raw.clone())
        .collect();
    assert!(!frames.is_empty(), "no frame of A's captured at B");
    for frame in frames {
        let opened = c.debug_open_frame(frame).await;
        assert!(matches!(opened, Err(Error::Forbidden(_))), "{opened:?}");
    }
    assert!(c.entities().get("light.porch").await.unwrap().is_none());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_refuses_writes_from_a_read_only_home() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    let c = start(dirs[2].path(), "c").await;
    a.entities().set("light.porch", write("off")).await.unwrap();
    pair(&a, &b).await;
    pair(&a, &c).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Read, None)
        .await
        .unwrap();
    a.shares()
        .share("light.porch", c.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "off").await;
    wait_state(&c, "light.porch", "off").await;

    // B's library, past B's own check.
    b.debug_write_unchecked("light.porch", write("forged"))
        .await
        .unwrap();
    until("A refuses and audits B's write", || async {
        a.shares()
            .audit(hearth::Timestamp::from_unix_ms(0))
            .await
            .unwrap()
            .iter()
            .any(|e| e.action == "write.refused" && e.actor == b.peer_id().as_str())
    })
    .await;
    // A write that C makes still flows, and B's never does.
    c.entities()
        .set("light.porch", write("from-c"))
        .await
        .unwrap();
    wait_state(&a, "light.porch", "from-c").await;
    wait_state(&b, "light.porch", "from-c").await;
    for node in [&a, &c] {
        let history = node.entities().history("light.porch", 1000).await.unwrap();
        assert!(
            history.iter().all(|v| v.device != b.peer_id()),
            "B's write reached {}",
            node.device_name()
        );
    }
    assert!(a.sync_counters().await.unwrap().frames_refused > 0);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_revoked_while_away_is_refused_when_it_returns() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities()
        .set("light.porch", write("before"))
        .await
        .unwrap();
    a.entities()
        .set("light.sentinel", write("before"))
        .await
        .unwrap();
    pair(&a, &b).await;
    for id in ["light.porch", "light.sentinel"] {
        a.shares()
            .share(id, b.home_id(), hearth::Rights::Write, None)
            .await
            .unwrap();
    }
    wait_state(&b, "light.porch", "before").await;
    wait_state(&b, "light.sentinel", "before").await;
    let b_home = b.home_id().to_string();
    b.shutdown().await.unwrap();

    a.shares().unshare("light.porch", &b_home).await.unwrap();
    for i in 0..100 {
        a.entities()
            .set("light.porch", write(&format!("secret-{i}")))
            .await
            .unwrap();
    }
    let b = start(dirs[1].path(), "b").await;
    let captured = b.debug_capture().await.unwrap();
    until("A refuses B's sync requests for the entity", || async {
        a.shares()
            .audit(hearth::Timestamp::from_unix_ms(0))
            .await
            .unwrap()
            .iter()
            .any(|e| e.action == "sync.refused" && e.actor == b.peer_id().as_str())
    })
    .await;
    // A write of the entity still shared with B arrives after anything A sent before it.
    a.entities()
        .set("light.sentinel", write("back"))
        .await
        .unwrap();
    wait_state(&b, "light.sentinel", "back").await;
    assert_eq!(
        b.entities()
            .get("light.porch")
            .await
            .unwrap()
            .unwrap()
            .state,
        "before"
    );
    let captured = captured.lock().unwrap().clone();
    for i in 0..100 {
        assert!(!captured_holds(&captured, format!("secret-{i}").as_bytes()));
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_reused_home_codes_change_nothing() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    let c = start(dirs[2].path(), "c").await;

    // Forged: a real code with one character changed fails its checksum or its secret.
    let code = a.invite_home(Duration::from_secs(600)).await.unwrap().code;
    let mut forged: Vec<char> = code.chars().collect();
    let i = forged.len() / 2;
    forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    let err = b.shares().pair(&forged).await.unwrap_err();
    assert!(matches!(err, Error::Pairing(_)), "{err:?}");

    // Expired.
    let short = a.invite_home(Duration::from_secs(1)).await.unwrap().code;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = b.shares().pair(&short).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    // A device code is not a home code.
    let device_code = a.invite(Duration::from_secs(600)).await.unwrap().code;
    let err = b.shares().pair(&device_code).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");

    assert!(a.shares().homes().await.unwrap().is_empty());
    assert!(b.shares().homes().await.unwrap().is_empty());

    // Used once, then refused.
    b.shares().pair(&code).await.unwrap();
    let err = c.shares().pair(&code).await.unwrap_err();
    assert!(matches!(err, Error::Pairing(_)), "{err:?}");
    let homes = a.shares().homes().await.unwrap();
    assert_eq!(homes.len(), 1);
    assert_eq!(homes[0].home_id, b.home_id());
    assert!(c.shares().homes().await.unwrap().is_empty());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

#[test]
fn the_rest_api_pairs_shares_refuses_and_unshares() {
    use crate::api::TestNode;
    use serde_json::json;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), "a");
    let b = TestNode::start(dirs[1].path(), "b");
    let (a_home, b_home) = (
        a.node().home_id().to_string(),
        b.node().home_id().to_string(),
    );

    b.refused(
        "POST",
        "/api/pair",
        r#"{"code":"not-a-code"}"#,
        400,
        "bad_request",
    );
    let invite = a.ok("POST", "/api/invites", Some(json!({"kind": "home"})), 200);
    let code = invite["code"].as_str().unwrap();
    let paired = b.ok("POST", "/api/pair", Some(json!({ "code": code })), 200);
    assert_eq!(paired["home_id"], a_home.as_str());
    let reused = json!({ "code": code }).to_string();
    b.refused("POST", "/api/pair", &reused, 409, "conflict");

    a.ok(
        "PUT",
        "/api/entities/light.porch",
        Some(json!({"state": "off"})),
        200,
    );
    let unknown_home = json!({"entity_id": "light.porch", "home": "nowhere"}).to_string();
    a.refused("POST", "/api/shares", &unknown_home, 404, "not_found");
    let unknown_entity = json!({"entity_id": "light.none", "home": b_home}).to_string();
    a.refused("POST", "/api/shares", &unknown_entity, 404, "not_found");
    let bad_policy =
        json!({"entity_id": "light.porch", "home": b_home, "policy": "loudest-wins"}).to_string();
    a.refused("POST", "/api/shares", &bad_policy, 400, "bad_request");
    let shared = a.ok(
        "POST",
        "/api/shares",
        Some(json!({"entity_id": "light.porch", "home": b_home, "read_only": true, "policy": "owner-wins"})),
        200,
    );
    assert_eq!(shared["rights"], "read");
    assert_eq!(shared["policy"], "owner-wins");

    let deadline = Instant::now() + T;
    while b.call("GET", "/api/entities/light.porch", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the shared entity never reached B"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let write = json!({"state": "on"}).to_string();
    b.refused("PUT", "/api/entities/light.porch", &write, 403, "forbidden");
    let listed = b.ok("GET", "/api/shares", None, 200);
    assert_eq!(listed["shared_in"][0]["rights"], "read");
    let homes = a.ok("GET", "/api/homes", None, 200);
    assert_eq!(homes["homes"][0]["we_share"][0], "light.porch");

    let out = a.ok(
        "DELETE",
        &format!("/api/shares/light.porch/{b_home}"),
        None,
        200,
    );
    assert!(
        out["epoch"]
            .as_str()
            .unwrap()
            .starts_with("0000000000000001-")
    );
    let audit = a.ok("GET", "/api/audit?since=1h", None, 200);
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in [
        "home.paired",
        "share.granted",
        "share.revoked",
        "key.rotated",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    a.refused("GET", "/api/audit?since=soon", "", 400, "bad_request");
    a.ok("DELETE", &format!("/api/homes/{b_home}"), None, 200);
    assert_eq!(a.ok("GET", "/api/homes", None, 200)["homes"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_choice_conflict_between_homes_waits_for_a_resolution() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities()
        .set("lock.door", write("locked"))
        .await
        .unwrap();
    pair(&a, &b).await;
    let out = a
        .shares()
        .share(
            "lock.door",
            b.home_id(),
            hearth::Rights::Write,
            Some(hearth::Policy::UserChoice),
        )
        .await
        .unwrap();
    assert_eq!(out.policy, hearth::Policy::UserChoice);
    wait_state(&b, "lock.door", "locked").await;

    // Concurrent writes: neither side reads the network while both write.
    a.debug_stall_network_reads(true);
    b.debug_stall_network_reads(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.entities()
        .set("lock.door", write("unlocked"))
        .await
        .unwrap();
    b.entities()
        .set("lock.door", write("jammed"))
        .await
        .unwrap();
    a.debug_stall_network_reads(false);
    b.debug_stall_network_reads(false);

    for node in [&a, &b] {
        until("both homes show the pending conflict", || async {
            node.entities().conflicts().await.unwrap().iter().any(|c| {
                c.entity_id == "lock.door" && c.field == "state" && c.candidates.len() == 2
            })
        })
        .await;
    }
    let pending = b.entities().conflicts().await.unwrap();
    let pick = pending[0]
        .candidates
        .iter()
        .position(|c| c.value == "unlocked")
        .unwrap();
    let resolved = b
        .entities()
        .resolve("lock.door", "state", pick)
        .await
        .unwrap();
    assert_eq!(resolved.state, "unlocked");
    wait_state(&a, "lock.door", "unlocked").await;
    until("the conflict is gone on the owner", || async {
        a.entities().conflicts().await.unwrap().is_empty()
    })
    .await;
    let err = b
        .entities()
        .resolve("lock.door", "state", 0)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    until("the owner audits the detection", || async {
        a.shares()
            .audit(hearth::Timestamp::from_unix_ms(0))
            .await
            .unwrap()
            .iter()
            .any(|e| e.action == "conflict.detected" && e.subject.starts_with("lock.door state"))
    })
    .await;
    assert!(
        b.shares()
            .audit(hearth::Timestamp::from_unix_ms(0))
            .await
            .unwrap()
            .iter()
            .any(|e| e.action == "conflict.resolved" && e.actor == b.peer_id().as_str())
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_refused_and_reads_nothing_new() {
    init_tracing();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    a.entities()
        .set("light.porch", write("before"))
        .await
        .unwrap();
    a.entities()
        .set("sensor.hall", write("before"))
        .await
        .unwrap();
    let a2 = crate::pairing::join_and_start(&a, dirs[1].path(), "a2").await;
    let a3 = crate::pairing::join_and_start(&a, dirs[2].path(), "a3").await;
    let b = start(dirs[3].path(), "b").await;
    pair(&a, &b).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    for node in [&a2, &a3, &b] {
        wait_state(node, "light.porch", "before").await;
    }
    wait_state(&a3, "sensor.hall", "before").await;

    // Only the admin can revoke, and not itself.
    let err = a2.revoke_device(a3.peer_id()).await.unwrap_err();
    assert!(matches!(err, Error::Forbidden(_)), "{err:?}");
    let err = a.revoke_device(a.peer_id()).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");

    let revoked = a.revoke_device("a3").await.unwrap();
    assert_eq!(revoked.peer_id, a3.peer_id());
    assert!(revoked.rotated >= 4, "{revoked:?}");
    let captured = a2.debug_capture().await.unwrap();
    a.entities()
        .set("sensor.hall", write("after"))
        .await
        .unwrap();
    a.entities()
        .set("light.porch", write("after"))
        .await
        .unwrap();
    wait_state(&a2, "sensor.hall", "after").await;
    wait_state(&a2, "light.porch", "after").await;
    wait_state(&b, "light.porch", "after").await;
    // The rest keep working both ways.
    a2.entities()
        .set("sensor.hall", write("from-a2"))
        .await
        .unwrap();
    wait_state(&a, "sensor.hall", "from-a2").await;
    b.entities()
        .set("light.porch", write("from-b"))
        .await
        .unwrap();
    wait_state(&a, "light.porch", "from-b").await;
    wait_state(&a2, "light.porch", "from-b").await;

    // The revoked device is not admitted anywhere and got nothing new: once A3 itself
    // holds no session with any device, nothing more can reach it.
    until(
        "no device admits the revoked one, and it admits none",
        || async {
            let mut clear = a3.admitted_peers().await.unwrap().is_empty();
            for node in [&a, &a2] {
                let peers = node.admitted_peers().await.unwrap();
                clear &= !peers.iter().any(|p| p == a3.peer_id());
            }
            clear
        },
    )
    .await;
    assert_eq!(
        a3.entities()
            .get("sensor.hall")
            .await
            .unwrap()
            .unwrap()
            .state,
        "before"
    );
    let frames: Vec<Vec<u8>> = captured
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.stream == "sync" && c.opened.is_some())
        .map(|c| c.raw.clone())
        .collect();
    assert!(!frames.is_empty(), "no frame captured after the revocation");
    let mut opened_by_revoked = 0;
    for frame in &frames {
        if a3.debug_open_frame(frame.clone()).await.is_ok() {
            opened_by_revoked += 1;
        }
    }
    assert_eq!(
        opened_by_revoked,
        0,
        "the revoked device opened {opened_by_revoked} of {} new frames",
        frames.len()
    );
    let audit = a
        .shares()
        .audit(hearth::Timestamp::from_unix_ms(0))
        .await
        .unwrap();
    assert!(audit.iter().any(|e| e.action == "device.revoked"));
    for node in [a, a2, a3, b] {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grantee_never_relays_a_shared_entity_to_its_own_devices() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.porch", write("on")).await.unwrap();
    b.entities().set("sensor.own", write("b's")).await.unwrap();
    pair(&a, &b).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "on").await;
    // B's second device knows only B; it syncs B's own entities, never A's.
    let b2 = crate::pairing::join_and_start(&b, dirs[2].path(), "b2").await;
    wait_state(&b2, "sensor.own", "b's").await;
    a.entities().set("light.porch", write("dim")).await.unwrap();
    wait_state(&b, "light.porch", "dim").await;
    // B's frames to B2 go in order: a write of B's own after B took A's change arrives
    // after anything B would have relayed.
    b.entities()
        .set("sensor.own", write("later"))
        .await
        .unwrap();
    wait_state(&b2, "sensor.own", "later").await;
    assert!(b2.entities().get("light.porch").await.unwrap().is_none());
    for node in [a, b, b2] {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grants_from_a_paired_home_are_dropped() {
    use hearth_crdt::wire::{self, Frame, GrantFrame};
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    a.entities().set("light.porch", write("on")).await.unwrap();
    pair(&a, &b).await;
    a.shares()
        .share("light.porch", b.home_id(), hearth::Rights::Write, None)
        .await
        .unwrap();
    wait_state(&b, "light.porch", "on").await;
    let cbor = |value: serde_json::Value| {
        let mut out = Vec::new();
        ciborium::into_writer(&value, &mut out).unwrap();
        out
    };
    // Well-formed grant messages whose contents are wrong, then ones that are not
    // messages at all: trailing bytes, JSON, oversized, plain garbage.
    let bogus_key = cbor(serde_json::json!({"Grant": {
        "entity_id": "light.fake", "doc": "11111111111111111111111", "epoch": {"counter": 0, "device": [0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]},
        "wrapped": [1, 2, 3], "rights": "write"}}));
    let bad_revoke = cbor(serde_json::json!({"Revoke": {"entity_id": "x", "doc": "??"}}));
    for payload in [
        b"not cbor".to_vec(),
        bogus_key.clone(),
        bad_revoke.clone(),
        [&bogus_key[..], &[0x00]].concat(),
        serde_json::to_vec(&serde_json::json!({"Revoke": {"entity_id": "x", "doc": "??"}}))
            .unwrap(),
        vec![0x81; 10_000],
        vec![b'['; 10_000],
    ] {
        let frame = wire::encode(&Frame::Grant(GrantFrame { bytes: payload }));
        a.debug_send_raw(b.peer_id(), false, frame).await.unwrap();
    }
    a.entities()
        .set("light.porch", write("still"))
        .await
        .unwrap();
    wait_state(&b, "light.porch", "still").await;
    assert!(b.entities().get("light.fake").await.unwrap().is_none());
    assert_eq!(b.shares().list().await.unwrap().shared_in.len(), 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
