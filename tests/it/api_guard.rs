//! What keeps the local API to its owner: the token file's permissions.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::util::{UpProcess, hearth, run};

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
