//! What keeps the local API to its owner: the token file's permissions, and names from
//! elsewhere made harmless before they reach a terminal.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;

use crate::util::{UpProcess, hearth, http_send, run};

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_token_file_others_can_read_is_refused_by_node_and_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join(hearth::TOKEN_FILE);
    let mut node = UpProcess::start(dir.path());
    let verb = |args: &[&str]| run(hearth().args(args).arg("--data").arg(dir.path()));
    assert!(verb(&["status"]).status.success());
    set_mode(&token, 0o644);
    for args in [&["status"][..], &["token"], &["entity", "list"]] {
        let out = verb(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("open to other users")
                && stderr.contains(&format!("chmod 600 {}", token.display())),
            "{args:?}: {stderr}"
        );
    }
    // A token passed explicitly does not touch the file.
    let text = std::fs::read_to_string(&token).unwrap();
    assert!(verb(&["status", "--token", text.trim()]).status.success());
    node.terminate();

    set_mode(&token, 0o640);
    let out = run(&mut crate::util::up_cmd(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");

    set_mode(&token, 0o600);
    let _node = UpProcess::start(dir.path());
    assert!(verb(&["status"]).status.success());
}

#[test]
fn names_from_elsewhere_reach_tables_without_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let node = UpProcess::start(dir.path());
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let token = token.trim();
    // An entity state and attribute (which a shared entity brings from another home) that
    // would clear the screen and retitle the window. Names (rooms, devices, notes, chat)
    // with control characters are refused where they are written, but another home's node
    // need not be this one; the CLI does not rely on it.
    let evil = "den\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m!";
    let send = |method: &str, path: &str, body: Value| {
        let (status, reply) = http_send(&node.api, method, path, Some(token), &body.to_string());
        assert!(status < 300, "{method} {path}: {status} {reply}");
    };
    send(
        "PUT",
        "/api/entities/light.x",
        serde_json::json!({ "state": evil, "attributes": { "label": evil } }),
    );
    let verb = |args: &[&str]| {
        let out = run(hearth().args(args).arg("--data").arg(dir.path()));
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for args in [&["entity", "list"][..], &["entity", "get", "light.x"]] {
        let out = verb(args);
        assert!(out.contains("den!"), "{args:?}: {out:?}");
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?}: {out:?}"
        );
    }
    // JSON stays exact: the escapes are escaped, not dropped.
    let out = verb(&["entity", "get", "light.x", "--json"]);
    let entity: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(entity["state"], evil);
}
