//! Acknowledged writes survive SIGKILL of the node that took them, on that node and on
//! its peer.

use std::time::{Duration, Instant};

use crate::util::{UpProcess, WAIT, free_port, hearth, http_send, run, signal, wait_exit};

fn entity_state(api: &str, token: &str, id: &str) -> Option<String> {
    let (code, body) = http_send(api, "GET", &format!("/api/entities/{id}"), Some(token), "");
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["state"].as_str().map(str::to_string)
}

#[test]
fn acknowledged_writes_survive_sigkill_on_the_node_and_its_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
    // A fixed port, so that B finds A again after A's restart.
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let mut a = UpProcess::start_with(&data_a, &["--listen", &listen]);
    let token_a = std::fs::read_to_string(data_a.join("token")).unwrap();
    let token_a = token_a.trim().to_string();

    let out = run(hearth().args(["invite", "--data"]).arg(&data_a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = run(hearth()
        .args(["join", &code, "--name", "b", "--data"])
        .arg(&data_b));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = UpProcess::start(&data_b);
    let token_b = std::fs::read_to_string(data_b.join("token")).unwrap();
    let token_b = token_b.trim().to_string();

    // Wait until B is admitted by A, so the writes below are pushed live.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http_send(&a.api, "GET", "/api/status", Some(&token_a), "");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["admitted"] == true))
        {
            break;
        }
        assert!(Instant::now() < deadline, "B was never admitted: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Every write below is acknowledged (200) before the next; then A dies at once.
    for i in 0..30 {
        let (code, body) = http_send(
            &a.api,
            "PUT",
            &format!("/api/entities/sensor.c{i}"),
            Some(&token_a),
            &format!(r#"{{"state": "v{i}"}}"#),
        );
        assert_eq!(code, 200, "{body}");
    }
    signal(a.child.id(), "KILL");
    wait_exit(&mut a.child, WAIT).expect("killed");

    // The killed node holds every one of them after a restart.
    let mut a2 = UpProcess::start_with(&data_a, &["--listen", &listen]);
    for i in 0..30 {
        assert_eq!(
            entity_state(&a2.api, &token_a, &format!("sensor.c{i}")).as_deref(),
            Some(format!("v{i}").as_str()),
            "acknowledged write {i} lost by the killed node"
        );
    }

    // And so does the peer: most arrived live before the kill; a push still queued in
    // the killed process arrives when the two reconcile after the restart.
    for i in 0..30 {
        let id = format!("sensor.c{i}");
        let deadline = Instant::now() + WAIT;
        while entity_state(&b.api, &token_b, &id).as_deref() != Some(&format!("v{i}")) {
            assert!(Instant::now() < deadline, "{id} never reached B");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(a2.terminate().code(), Some(0));
}
