//! The store failing and coming back: a full disk (a small tmpfs), damaged records, and
//! store batches in flight at shutdown.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::{WAIT, http_get, http_send, signal, up_cmd, wait_exit, wait_until};

/// A tmpfs mounted for one test, unmounted (lazily, so a stuck child cannot block it) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            })
            .unwrap_or_default();
        assert_eq!(
            uid, "0",
            "this test mounts a small tmpfs to fill it, so it must run as root (CI does); \
             run it with sudo or in a container"
        );
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `hearth up` with its log kept in a file, killed on drop.
struct Logged {
    child: Child,
    api: String,
    token: String,
}

impl Logged {
    fn start(data: &Path, log: &Path) -> Self {
        let mut child = up_cmd(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .expect("spawn hearth up");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).expect("read first line");
        assert!(first.contains("is up"), "node did not start: {first:?}");
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let api = wait_until(|| std::fs::read_to_string(data.join("api.addr")).ok())
            .trim()
            .to_string();
        let token = std::fs::read_to_string(data.join(hearth::TOKEN_FILE))
            .unwrap()
            .trim()
            .to_string();
        Logged { child, api, token }
    }

    fn put(&self, id: &str, state: &str) -> (u16, serde_json::Value) {
        self.put_padded(id, state, "")
    }

    /// A write whose attributes carry `padding`, to fill the disk faster.
    fn put_padded(&self, id: &str, state: &str, padding: &str) -> (u16, serde_json::Value) {
        let body =
            serde_json::json!({ "state": state, "attributes": { "padding": padding } }).to_string();
        let (status, text) = http_send(
            &self.api,
            "PUT",
            &format!("/api/entities/{id}"),
            Some(&self.token),
            &body,
        );
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, text) = http_get(&self.api, path, Some(&self.token));
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    fn state_of(&self, id: &str) -> Option<String> {
        match self.get(&format!("/api/entities/{id}")) {
            (200, body) => body["state"].as_str().map(str::to_string),
            _ => None,
        }
    }

    /// SIGTERM, then the exit status, which must come (the stop is bounded).
    fn stop(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        wait_exit(&mut self.child, WAIT).expect("node did not exit after SIGTERM")
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a file until the disk is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0x5au8; 16 * 1024];
    loop {
        match file.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_disk_answers_507_turns_unready_and_recovers_once_space_returns() {
    let disk = Tmpfs::mount("8m");
    let data = disk.path().join("node");
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("node.log");
    let node = Logged::start(&data, &log);

    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for i in 0..3 {
        let (id, state) = (format!("light.l{i}"), format!("before-{i}"));
        assert_eq!(node.put(&id, &state).0, 200);
        acknowledged.push((id, state));
    }
    let filler = fill(disk.path());

    // Writes until the store notices the disk is full: that write is applied (in memory
    // and on peers) but not durable, and its answer says so.
    let big = "x".repeat(32 * 1024);
    let mut failed = None;
    for i in 0..400 {
        let (id, state) = (format!("fill.f{i}"), format!("v{i}"));
        match node.put_padded(&id, &state, &big) {
            (200, _) => acknowledged.push((id, state)),
            (507, body) => {
                failed = Some((id, state, body));
                break;
            }
            (status, body) => panic!("unexpected answer {status}: {body}"),
        }
    }
    let (failed_id, failed_state, body) = failed.expect("the disk never filled up");
    assert_eq!(body["error"], "insufficient_storage", "{body}");
    assert_eq!(body["applied"], true, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("not durable"),
        "{body}"
    );
    // The answer and a read agree: the write is there.
    assert_eq!(node.state_of(&failed_id).as_deref(), Some(&*failed_state));

    // Failed: not ready, and further writes are refused before they apply.
    let (status, body) = http_get(&node.api, "/health/ready", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store"), "{body}");
    let (status, body) = node.put("light.refused", "on");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["applied"], false, "{body}");
    assert_eq!(node.state_of("light.refused"), None);
    let (_, status_body) = node.get("/api/status");
    assert_eq!(status_body["store"]["health"], "failed", "{status_body}");

    // Space comes back: the store recovers by itself and takes writes again.
    std::fs::remove_file(&filler).unwrap();
    wait_until(|| (http_get(&node.api, "/health/ready", None).0 == 200).then_some(()));
    assert_eq!(node.put("light.after", "on").0, 200);
    acknowledged.push(("light.after".into(), "on".into()));
    // The write that was applied but not stored is stored now; the restart below shows it.
    acknowledged.push((failed_id, failed_state));

    let status = node.stop();
    assert!(status.success(), "hearth up exited with {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("store failed"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line for the outage:\n{text}"
    );

    let node = Logged::start(&data, &logs.path().join("again.log"));
    for (id, state) in &acknowledged {
        assert_eq!(node.state_of(id).as_deref(), Some(&**state), "{id} lost");
    }
    assert!(node.stop().success());
}

/// The document ids with records in DocChunks, read from the raw store of a stopped node.
fn stored_docs(data: &Path) -> std::collections::BTreeSet<Vec<u8>> {
    use hearth_storage::{Keyspace, Scan, SledStore, Store};
    let store = SledStore::open(&data.join(hearth_storage::STORE_DIR), 1 << 20, false).unwrap();
    store
        .scan(Keyspace::DocChunks, &Scan::all().limit(100_000))
        .unwrap()
        .into_iter()
        .map(|(key, _)| key[..hearth_storage::DOC_ID_LEN].to_vec())
        .collect()
}

/// Flips one byte of the sealed value of every stored record of document `doc`, as bit
/// rot would, so each fails its integrity check.
fn damage(data: &Path, doc: &[u8]) {
    use hearth_storage::{Keyspace, Scan, SledStore, Store};
    let mut store = SledStore::open(&data.join(hearth_storage::STORE_DIR), 1 << 20, false).unwrap();
    let records = store
        .scan(Keyspace::DocChunks, &Scan::prefix(doc.to_vec()))
        .unwrap();
    assert!(!records.is_empty());
    for (key, mut value) in records {
        let last = value.len() - 1;
        value[last] ^= 0x40;
        store.put(Keyspace::DocChunks, &key, &value).unwrap();
    }
    store.flush().unwrap();
}

fn hearth_json(node: &Logged, args: &[&str]) -> serde_json::Value {
    let out = crate::util::run(crate::util::hearth().args(args).args([
        "--json",
        "--api",
        &node.api,
        "--token",
        &node.token,
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_damaged_record_quarantines_its_document_and_the_node_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let log = dir.path().join("node.log");
    let node = Logged::start(&data, &log);
    assert!(node.stop().success());
    let before = stored_docs(&data);

    let node = Logged::start(&data, &log);
    assert_eq!(node.put("light.kitchen", "on").0, 200);
    assert_eq!(node.put("light.hall", "off").0, 200);
    assert!(node.stop().success());
    let kitchen_and_hall: Vec<Vec<u8>> = stored_docs(&data).difference(&before).cloned().collect();
    assert_eq!(kitchen_and_hall.len(), 2);

    // Damage one of the two entity documents; the node must start anyway. Entity
    // documents load when first used, so the damage is found by the first read.
    damage(&data, &kitchen_and_hall[0]);
    let node = Logged::start(&data, &log);
    let read = [node.state_of("light.kitchen"), node.state_of("light.hall")];
    assert_eq!(read.iter().filter(|s| s.is_some()).count(), 1, "{read:?}");
    let status = hearth_json(&node, &["status"]);
    let quarantined = status["store"]["quarantined"].as_array().unwrap().clone();
    assert_eq!(quarantined.len(), 1, "{status}");
    let entity = quarantined[0]["entity"].as_str().unwrap().to_string();
    let other = if entity == "light.kitchen" {
        "light.hall"
    } else {
        "light.kitchen"
    };
    assert!(
        node.state_of(other).is_some(),
        "the undamaged entity is not readable"
    );

    let out = crate::util::run(crate::util::hearth().args([
        "status",
        "--api",
        &node.api,
        "--token",
        &node.token,
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 document(s) quarantined"), "{text}");

    let listed = hearth_json(&node, &["repair"]);
    assert_eq!(
        listed["quarantined"],
        serde_json::Value::Array(quarantined.clone())
    );
    let dropped = hearth_json(&node, &["repair", "--drop"]);
    assert_eq!(dropped["dropped"], serde_json::Value::Array(quarantined));
    assert_eq!(
        hearth_json(&node, &["repair"])["quarantined"],
        serde_json::json!([])
    );
    assert!(node.stop().success());

    // The next start is clean: nothing quarantined, the rest intact.
    let node = Logged::start(&data, &log);
    let status = hearth_json(&node, &["status"]);
    assert_eq!(
        status["store"]["quarantined"],
        serde_json::json!([]),
        "{status}"
    );
    assert!(node.state_of(other).is_some());
    assert!(node.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_received_before_shutdown_is_on_disk_after_restart() {
    use crate::pairing::{T, config, join_and_start, write};
    use hearth::Node;
    use tokio::time::timeout;

    const WRITES: usize = 400;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = timeout(T, Node::start(config(dirs[0].path(), "a")))
        .await
        .unwrap()
        .unwrap();
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    timeout(T, async {
        while a.admitted_peers().await.unwrap().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();

    // Each write makes a new document on A, so B persists hundreds of remote changes.
    let writes = (0..WRITES)
        .map(|i| (format!("sensor.n{i}").into(), write(&format!("v{i}"))))
        .collect();
    timeout(T, a.entities().set_many(writes))
        .await
        .unwrap()
        .unwrap();
    // B holds every change in memory; stop it at once, with its batches still in flight.
    // Catching up on 400 new documents took over 30 s on a machine busy with builds; the
    // wait is generous, the check the same.
    timeout(3 * T, async {
        while b.entities().list().await.unwrap().len() < WRITES {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("B never received every change");
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();

    // Alone (A is gone, so nothing can be synced back): everything B received is on disk.
    let b = timeout(T, Node::start(config(dirs[1].path(), "b")))
        .await
        .unwrap()
        .unwrap();
    let held = timeout(T, b.entities().list()).await.unwrap().unwrap();
    assert_eq!(held.len(), WRITES, "B lost changes it had received");
    timeout(T, b.shutdown()).await.unwrap().unwrap();
}
