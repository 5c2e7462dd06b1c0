//! `hearth up` as a process: start, status, refusal of a second node, clean stop.

use std::time::Duration;

use crate::util::{UpProcess, hearth, http_get, run, up_cmd, wait_exit};

#[test]
fn up_serves_status_refuses_a_second_node_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("home");
    let mut node = UpProcess::start(&data);

    // Health probes need no token.
    let (code, body) = http_get(&node.api, "/health/ready", None);
    assert_eq!(code, 200, "{body}");
    let (code, _) = http_get(&node.api, "/health/live", None);
    assert_eq!(code, 200);

    // The API refuses a missing or wrong token with a JSON error.
    let (code, body) = http_get(&node.api, "/api/status", None);
    assert_eq!(code, 401);
    assert!(body.contains("\"error\":\"unauthorized\""), "{body}");
    let (code, _) = http_get(&node.api, "/api/status", Some("wrong"));
    assert_eq!(code, 401);

    // `status --json` finds the node through api.addr and the token file.
    let out = run(hearth().args(["status", "--json", "--data"]).arg(&data));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["peer_id"], node.peer_id.as_str());
    assert_eq!(status["data_dir"], data.to_str().unwrap());
    assert!(status["uptime_s"].as_f64().unwrap() >= 0.0);
    assert!(
        status["home"]["home_id"]
            .as_str()
            .is_some_and(|h| !h.is_empty())
    );
    // It listens where told, on loopback only, and has no peers.
    let listen = status["listen"].as_array().unwrap();
    assert!(!listen.is_empty());
    assert!(
        listen
            .iter()
            .all(|a| a.as_str().unwrap().starts_with("/ip4/127.0.0.1/tcp/")),
        "{listen:?}"
    );
    assert_eq!(status["peers"], serde_json::json!([]));

    // The text form shows the PeerId too.
    let out = run(hearth().args(["status", "--data"]).arg(&data));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&node.peer_id));

    // A second node on the same data dir is refused at once, with a clear reason.
    let out = run(&mut up_cmd(&data));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");

    // SIGTERM: exit 0, and api.addr is gone.
    let status = node.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(!data.join("api.addr").exists());

    // With no node running, status says so and suggests `hearth up`.
    let out = run(hearth().args(["status", "--data"]).arg(&data));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Hearth node is running") && err.contains("hearth up"),
        "{err}"
    );
}

#[test]
fn identity_survives_restart_and_stale_api_addr_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("home");
    let mut first = UpProcess::start(&data);
    let peer_id = first.peer_id.clone();
    let api = first.api.clone();

    // SIGKILL leaves api.addr behind; the client must name the dead address.
    crate::util::signal(first.child.id(), "KILL");
    wait_exit(&mut first.child, Duration::from_secs(10)).expect("killed");
    let out = run(hearth().args(["status", "--data"]).arg(&data));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Hearth node is running at") && err.contains(&api),
        "{err}"
    );

    // The OS lock died with the process, so a restart works and keeps the identity.
    let mut second = UpProcess::start(&data);
    assert_eq!(second.peer_id, peer_id);
    assert_eq!(second.terminate().code(), Some(0));
}

#[test]
fn status_without_any_node_names_the_data_dir_and_suggests_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(hearth().args(["status", "--data"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Hearth node is running") && err.contains("hearth up"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_with_two() {
    let out = run(hearth().args(["up", "--api", "not-an-address"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unusable_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = run(&mut up_cmd(&file.join("sub")));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use data dir"), "{err}");
}

#[test]
fn passphrase_store_refuses_a_wrong_passphrase_and_opens_with_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("home");
    let start = |pass: &str| {
        let mut cmd = up_cmd(&data);
        cmd.env("HEARTH_PASSPHRASE", pass);
        cmd
    };
    // First start creates the store under the passphrase; no key file is written.
    let mut child = start("correct horse")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::util::wait_until(|| data.join("api.addr").exists().then_some(()));
    assert!(!data.join("store.key").exists());
    crate::util::signal(child.id(), "TERM");
    let status = wait_exit(&mut child, crate::util::WAIT).expect("exit");
    assert_eq!(status.code(), Some(0));

    let out = run(&mut start("wrong horse"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(
        !err.contains("wrong horse"),
        "the passphrase must not be echoed: {err}"
    );

    // Without the passphrase, the node says the store needs one rather than making a key file.
    let out = run(&mut up_cmd(&data));
    assert_eq!(out.status.code(), Some(1));
    assert!(!data.join("store.key").exists());
}

#[test]
fn bad_network_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["up", "--no-mdns", "--api", "127.0.0.1:0"];
    let out = run(hearth()
        .args(base)
        .args(["--listen", "not-a-multiaddr", "--data"])
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen address") && err.contains("not a multiaddr"),
        "{err}"
    );

    let out = run(hearth()
        .args(base)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--peer",
            "/ip4/127.0.0.1/tcp/9",
            "--data",
        ])
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/p2p/"), "{err}");
}

#[test]
fn up_exits_1_when_its_core_task_dies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("home");
    let out = run(up_cmd(&data).env("HEARTH_TEST_ABORT_CORE", "1"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It had started (the banner is printed once the API serves), then noticed.
    assert!(stdout.contains("is up"), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("core task"), "{stderr}");
    // The exit still released the data dir: a new node starts on it.
    let mut again = crate::util::UpProcess::start(&data);
    assert!(again.terminate().success());
}

#[test]
fn a_node_reports_its_core_task_dying() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = tokio::time::timeout(
            crate::util::WAIT,
            hearth::Node::start(crate::api::config(dir.path(), "den")),
        )
        .await
        .unwrap()
        .unwrap();
        // A healthy node reports nothing: a write goes through first, and `failed` is
        // still pending after it.
        let write = hearth::EntityWrite {
            state: "on".into(),
            ..Default::default()
        };
        tokio::time::timeout(crate::util::WAIT, node.entities().set("light.a", write))
            .await
            .unwrap()
            .unwrap();
        assert!(futures::FutureExt::now_or_never(node.failed()).is_none());
        let api = node.api_addr().unwrap().to_string();
        let ready = tokio::task::spawn_blocking({
            let api = api.clone();
            move || crate::util::http_get(&api, "/health/ready", None)
        });
        assert_eq!(ready.await.unwrap().0, 200);
        node.debug_abort_core();
        let reason = tokio::time::timeout(crate::util::WAIT, node.failed())
            .await
            .expect("the core's death was never reported");
        assert!(reason.contains("core"), "{reason}");
        // Readiness asks the core itself, so it turns unready at once.
        let (status, body) =
            tokio::task::spawn_blocking(move || crate::util::http_get(&api, "/health/ready", None))
                .await
                .unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("core"), "{body}");
        let stopped = tokio::time::timeout(crate::util::WAIT, node.shutdown())
            .await
            .unwrap();
        assert!(stopped.is_err(), "shutdown hides the failure");
    });
}
