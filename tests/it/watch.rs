//! `hearth events` and `hearth entity watch` end to end: a real node, a real watcher
//! process, and a write from another `hearth` command.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, sync_channel};

use crate::util::{UpProcess, WAIT, hearth, run};

/// Lines held for the test before the reader thread waits.
const LINE_BUFFER: usize = 64;

/// A running watcher whose stdout and stderr lines arrive on channels; killed on drop.
struct Watcher {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl Watcher {
    fn start(args: &[&str], data: &std::path::Path) -> Self {
        let mut child = hearth()
            .args(args)
            .arg("--data")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn watcher");
        let lines = |pipe: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = sync_channel(LINE_BUFFER);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().expect("stdout")));
        let stderr = lines(Box::new(child.stderr.take().expect("stderr")));
        let watcher = Self {
            child,
            stdout,
            stderr,
        };
        // "watching" is printed once the node has applied the subscription.
        let first = watcher
            .stderr
            .recv_timeout(WAIT)
            .expect("the watcher never said it was watching");
        assert!(first.starts_with("watching"), "{first}");
        watcher
    }

    fn line(&self) -> String {
        self.stdout
            .recv_timeout(WAIT)
            .expect("no line from the watcher in time")
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set(data: &std::path::Path, id: &str, state: &str) {
    let out = run(hearth()
        .args(["entity", "set", id, state, "--attr", "level=3", "--data"])
        .arg(data));
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn events_prints_one_line_per_event_and_json_prints_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let node = UpProcess::start(dir.path());
    let plain = Watcher::start(&["events"], dir.path());
    let json = Watcher::start(&["events", "entity.*", "--json"], dir.path());
    set(dir.path(), "light.porch", "on");
    let line = plain.line();
    assert!(
        line.starts_with("entity.changed light.porch on {\"level\":3} by "),
        "{line}"
    );
    assert!(line.ends_with(&node.peer_id), "{line}");
    let frame: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(frame["type"], "state_update");
    assert_eq!(frame["data"]["entity_id"], "light.porch");
    assert_eq!(frame["data"]["attributes"]["level"], 3);
}

#[test]
fn entity_watch_prints_only_the_entities_its_pattern_matches() {
    let dir = tempfile::tempdir().unwrap();
    let _node = UpProcess::start(dir.path());
    let lights = Watcher::start(&["entity", "watch", "light.*", "--json"], dir.path());
    set(dir.path(), "sensor.door", "open");
    set(dir.path(), "light.porch", "off");
    let change: serde_json::Value = serde_json::from_str(&lights.line()).unwrap();
    assert_eq!(change["entity_id"], "light.porch");
    assert_eq!(change["state"], "off");

    let plain = Watcher::start(&["entity", "watch"], dir.path());
    let out = run(hearth()
        .args(["entity", "delete", "light.porch", "--data"])
        .arg(dir.path()));
    assert!(out.status.success(), "{out:?}");
    let line = plain.line();
    assert!(line.starts_with("light.porch deleted by "), "{line}");
    let deleted: serde_json::Value = serde_json::from_str(&lights.line()).unwrap();
    assert_eq!(deleted["name"], "entity.deleted");
    assert_eq!(deleted["subject"], "light.porch");
}

#[test]
fn watch_without_a_node_or_with_a_bad_pattern_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(hearth().args(["events", "--data"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Hearth node is running"), "{err}");
    let out = run(hearth()
        .args(["events", "entity..x", "--data"])
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid pattern"));
}
