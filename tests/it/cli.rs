//! The CLI end to end against `hearth up` processes, with assert_cmd.

use std::path::Path;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::Value;

use crate::util::{UpProcess, WAIT, hearth};

/// `hearth ARGS... --data DATA`, with the CLI's variables cleared.
fn cli(data: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::from_std(hearth());
    cmd.args(args).arg("--data").arg(data).timeout(WAIT);
    cmd
}

/// Runs a verb that must succeed and returns its stdout.
fn ok(data: &Path, args: &[&str]) -> String {
    let out = cli(data, args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap()
}

fn ok_json(data: &Path, args: &[&str]) -> Value {
    let text = ok(data, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

#[test]
fn room_chat_reaches_the_second_device_and_history_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let _a = UpProcess::start(&a_dir);
    let code = ok(&a_dir, &["invite", "--ttl", "1m"]);
    ok(&b_dir, &["join", code.trim(), "--name", "hallway"]);
    let _b = UpProcess::start(&b_dir);

    let created = ok_json(&a_dir, &["room", "create", "den", "--max", "4", "--json"]);
    assert_eq!(created["name"], "den");
    let said = ok(&a_dir, &["room", "say", "den", "dinner is ready"]);
    assert!(said.contains("dinner is ready"), "{said}");
    let shown = ok(&a_dir, &["room", "show", "den"]);
    assert!(shown.contains("den") && shown.contains("USER"), "{shown}");

    // The second device of the home sees the message once the room has synced.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = cli(&b_dir, &["room", "chat", "den", "--json"])
            .output()
            .unwrap();
        if out.status.success() {
            let body: Value = serde_json::from_slice(&out.stdout).unwrap();
            let messages = body["messages"].as_array().unwrap();
            if let Some(m) = messages.first() {
                assert_eq!(m["message"], "dinner is ready");
                assert_eq!(m["room_id"], created["room_id"]);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "message did not reach the second device"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Two sets, both in history; restore brings back the first.
    let first = ok_json(
        &a_dir,
        &[
            "entity",
            "set",
            "light.porch",
            "on",
            "--attr",
            "level=3",
            "--json",
        ],
    );
    let second = ok_json(&a_dir, &["entity", "set", "light.porch", "off", "--json"]);
    let history = ok_json(&a_dir, &["entity", "history", "light.porch", "--json"]);
    let versions: Vec<&str> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    for v in [&first, &second] {
        assert!(
            versions.contains(&v["version"].as_str().unwrap()),
            "{history}"
        );
    }
    let table = ok(&a_dir, &["entity", "history", "light.porch"]);
    assert!(
        table.contains(&first["version"].as_str().unwrap()[..16]),
        "{table}"
    );
    let prefix = &first["version"].as_str().unwrap()[..8];
    ok(&a_dir, &["entity", "restore", "light.porch", prefix]);
    let now = ok_json(&a_dir, &["entity", "get", "light.porch", "--json"]);
    assert_eq!(now["state"], "on");
    assert_eq!(now["attributes"]["level"], 3);

    // Presence and peers read back, as JSON and as tables.
    ok(&a_dir, &["presence", "set", "away", "--user", "alice"]);
    let p = ok_json(&a_dir, &["presence", "show", "alice", "--json"]);
    assert_eq!(p["status"], "away");
    let online = ok(&a_dir, &["presence", "online"]);
    assert!(online.contains("alice"), "{online}");
    let peers = ok_json(&a_dir, &["peers", "--json"]);
    assert!(!peers["peers"].as_array().unwrap().is_empty(), "{peers}");
    let status = ok(&a_dir, &["status"]);
    assert!(status.contains("DOCS BEHIND"), "{status}");
    ok(&a_dir, &["entity", "delete", "light.porch"]);
    cli(&a_dir, &["entity", "get", "light.porch"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("404"));
    // A status that cannot be set is a usage error.
    cli(&a_dir, &["presence", "set", "offline"])
        .assert()
        .code(2);
}

#[test]
fn without_a_node_the_error_names_the_address_and_suggests_up() {
    let dir = tempfile::tempdir().unwrap();
    // A port with nothing behind it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for args in [
        vec!["status".to_string(), "--api".into(), addr.to_string()],
        vec!["room".into(), "chat".into(), "den".into()],
    ] {
        if args[0] == "room" {
            // A stale api.addr, as a node killed without cleanup leaves.
            std::fs::write(dir.path().join("api.addr"), addr.to_string()).unwrap();
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(dir.path(), &args)
            .assert()
            .code(1)
            .stderr(predicates::str::contains("no Hearth node is running"))
            .stderr(predicates::str::contains(format!("http://{addr}")))
            .stderr(predicates::str::contains("hearth up"));
    }
    // No api.addr at all: the message names the data dir it looked in.
    std::fs::remove_file(dir.path().join("api.addr")).unwrap();
    cli(dir.path(), &["peers"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("no Hearth node is running"))
        .stderr(predicates::str::contains(dir.path().to_str().unwrap()))
        .stderr(predicates::str::contains("hearth up"));
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = crate::util::up_cmd(dir.path())
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Read until the start-up line; every line on the way must be a JSON object.
    while !seen
        .iter()
        .any(|v: &Value| v["fields"]["message"] == "node started")
    {
        let line = lines.next().expect("log line before exit").unwrap();
        let value: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string(), "{value}");
        seen.push(value);
    }
    crate::util::signal(child.id(), "TERM");
    assert!(crate::util::wait_exit(&mut child, WAIT).is_some_and(|s| s.success()));
}

#[test]
fn two_homes_pair_share_and_unshare_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let _a = UpProcess::start(&a_dir);
    let _b = UpProcess::start(&b_dir);
    let b_home = ok_json(&b_dir, &["status", "--json"])["home"]["home_id"]
        .as_str()
        .unwrap()
        .to_string();

    let code = ok(&a_dir, &["invite", "--home", "--ttl", "1m"]);
    let paired = ok(&b_dir, &["join", code.trim()]);
    assert!(paired.starts_with("paired with home"), "{paired}");
    // The same code again: refused, and it says why.
    cli(&b_dir, &["join", code.trim()])
        .assert()
        .failure()
        .stderr(predicates::str::contains("already paired"));

    ok(&a_dir, &["entity", "set", "light.porch", "off"]);
    let shared = ok(
        &a_dir,
        &["share", "light.porch", "--with", &b_home, "--read-only"],
    );
    assert!(
        shared.contains("shared light.porch") && shared.contains("read"),
        "{shared}"
    );
    let homes = ok_json(&a_dir, &["homes", "--json"]);
    assert_eq!(homes["homes"][0]["we_share"][0], "light.porch");

    let deadline = Instant::now() + WAIT;
    loop {
        let out = cli(&b_dir, &["entity", "get", "light.porch", "--json"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shared entity never reached B"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cli(&b_dir, &["entity", "set", "light.porch", "on"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("read-only"));
    let listed = ok_json(&b_dir, &["shared", "--json"]);
    assert_eq!(listed["shared_in"][0]["rights"], "read");

    let unshared = ok(&a_dir, &["unshare", "light.porch", "--from", &b_home]);
    assert!(unshared.contains("epoch 0000000000000001-"), "{unshared}");
    let audit = ok_json(&a_dir, &["audit", "--since", "1h", "--json"]);
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
    // Many at once: a pattern over this home's entities.
    ok(&a_dir, &["entity", "set", "switch.fan", "off"]);
    ok(&a_dir, &["entity", "set", "switch.heater", "on"]);
    let many = ok_json(
        &a_dir,
        &[
            "share",
            "switch.*",
            "--with",
            &b_home,
            "--read-only",
            "--json",
        ],
    );
    let ids: Vec<&str> = many["shared"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["entity_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["switch.fan", "switch.heater"], "{many}");
    assert_eq!(many["failed"], serde_json::json!([]));
    cli(&a_dir, &["share", "cover.*", "--with", &b_home])
        .assert()
        .failure()
        .stderr(predicates::str::contains(
            "no entity of this home matches cover.*",
        ));
    cli(&a_dir, &["revoke-device", "nobody"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("no device nobody"));
}

#[test]
fn locks_from_the_command_line_acquire_refuse_show_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = UpProcess::start(&data);
    let key = ok(
        &data,
        &[
            "lock",
            "acquire",
            "motor1",
            "--type",
            "QUEUE_EXECUTING",
            "--timeout",
            "5m",
            "--reason",
            "plan 7",
            "--user",
            "queue",
        ],
    )
    .trim()
    .to_string();
    assert_eq!(key.len(), 32, "the key alone on stdout: {key:?}");
    // A lower priority is refused with the holder named, exit 1.
    let refused = cli(
        &data,
        &["lock", "acquire", "motor1", "--type", "3", "--user", "me"],
    )
    .assert()
    .failure()
    .get_output()
    .stderr
    .clone();
    let refused = String::from_utf8(refused).unwrap();
    assert!(refused.contains("queue"), "{refused}");
    let status = ok(&data, &["lock", "status"]);
    assert!(
        status.contains("motor1 QUEUE_EXECUTING by queue"),
        "{status}"
    );
    assert!(!status.contains(&key));
    let one = ok_json(&data, &["lock", "status", "motor1", "--json"]);
    assert_eq!(one["locked"], true);
    // A wrong key: the node's refusal, exit 1.
    cli(
        &data,
        &["lock", "release", "motor1", "0000", "--user", "queue"],
    )
    .assert()
    .failure();
    let released = ok(
        &data,
        &["lock", "release", "motor1", &key, "--user", "queue"],
    );
    assert!(released.contains("released"), "{released}");
    assert!(ok(&data, &["lock", "status"]).contains("no locks held"));
    // One device: it is the arbiter; naming a device the home does not have fails,
    // naming itself keeps it.
    assert!(ok(&data, &["lock", "arbiter"]).contains("(this device)"));
    let info = ok_json(&data, &["lock", "arbiter", "--json"]);
    assert_eq!(info["granting"], true);
    let missing = cli(&data, &["lock", "arbiter", "no-such-device"])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(
        String::from_utf8_lossy(&missing).contains("no-such-device"),
        "{}",
        String::from_utf8_lossy(&missing)
    );
    // Notifications and a user's state from the command line.
    let sent = ok(
        &data,
        &["notify", "ann", "Dinner is ready", "--priority", "high"],
    );
    assert!(sent.contains("sent to ann"), "{sent}");
    cli(&data, &["notify", "ann", "x", "--priority", "loud"])
        .assert()
        .failure();
    assert!(ok(&data, &["user", "state", "ann"]).contains("ann has no state"));
    let state = ok_json(&data, &["user", "state", "ann", "--json"]);
    assert_eq!(state["user"], "ann");
    let name = info["device_name"].as_str().unwrap().to_string();
    let same = ok_json(&data, &["lock", "arbiter", &name, "--json"]);
    assert_eq!(same["peer_id"], info["peer_id"]);
    assert_eq!(same["granting"], true);
    assert!(node.terminate().success());
}

#[test]
fn config_check_reads_the_file_and_the_environment_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("hearth.toml"),
        "[session_management]\nsession_ttl = 600\nredis_url = \"redis://localhost\"\n\n\
         [synchronization]\nconflict_resolution = \"vector_clock\"\n\n\
         [push_services]\nntfy = [\"http://127.0.0.1:9/family\"]\n",
    )
    .unwrap();
    let checked = ok_json(&data, &["config", "check", "--json"]);
    assert_eq!(checked["session_management"]["session_ttl"], 600);
    assert_eq!(
        checked["synchronization"]["conflict_resolution"],
        "vector_clock"
    );
    assert_eq!(checked["push_services"]["targets"][0]["kind"], "ntfy");
    assert!(
        checked["unused"][0]
            .as_str()
            .unwrap()
            .contains("session_management.redis_url"),
        "{checked}"
    );
    // The environment wins over the file.
    let over = cli(&data, &["config", "check", "--json"])
        .env("HEARTH_SESSION_MANAGEMENT__MAX_DEVICES_PER_USER", "2")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let over: serde_json::Value = serde_json::from_slice(&over).unwrap();
    assert_eq!(over["session_management"]["max_devices_per_user"], 2);
    // A misspelt key and a bad value are named.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[websocket]\nheartbeat_intervall = 5\n").unwrap();
    let out = cli(&data, &["config", "check", bad.to_str().unwrap()])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(String::from_utf8_lossy(&out).contains("heartbeat_intervall"));
    std::fs::write(&bad, "[session_management]\nmax_devices_per_user = 0\n").unwrap();
    let out = cli(&data, &["config", "check", bad.to_str().unwrap()])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(String::from_utf8_lossy(&out).contains("max_devices_per_user"));
}

#[test]
fn config_check_shows_no_secret_and_reads_numbers_from_the_environment_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("hearth.toml"),
        "[session_management]\nredis_url = \"redis://app:hunter2@redis.lan:6379/0\"\n\n\
         [push_services]\nwebhooks = [\"https://hooks.example.com/T0/B1/tok3n?sig=abc\"]\n\
         ntfy = [\"http://127.0.0.1:9/family-topic-k7\"]\nfcm_server_key = \"AAAAfcmkey\"\n",
    )
    .unwrap();
    let secrets = [
        "hunter2",
        "app:",
        "tok3n",
        "sig=abc",
        "family-topic-k7",
        "AAAAfcmkey",
    ];
    for json in [false, true] {
        let mut args = vec!["config", "check"];
        if json {
            args.push("--json");
        }
        let out = cli(&data, &args)
            .env("HEARTH_NODE__NAME", "1234")
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        let out = String::from_utf8(out).unwrap();
        for secret in secrets {
            assert!(!out.contains(secret), "{secret} is shown:\n{out}");
        }
        assert!(out.contains("<set, 10 chars>"), "{out}");
        assert!(out.contains("redis://redis.lan:6379"), "{out}");
        assert!(out.contains("https://hooks.example.com"), "{out}");
        assert!(out.contains("http://127.0.0.1:9"), "{out}");
    }
    let checked: Value = serde_json::from_slice(
        &cli(&data, &["config", "check", "--json"])
            .env("HEARTH_NODE__NAME", "1234")
            .env("HEARTH_AGENT__NAME", "true")
            .assert()
            .success()
            .get_output()
            .stdout,
    )
    .unwrap();
    assert_eq!(checked["node"]["name"], "1234");
    assert_eq!(checked["sources"]["agent.name"]["value"], "true");
    assert_eq!(
        checked["push_services"]["targets"][0]["url"],
        "https://hooks.example.com"
    );
    // A secret given a value of the wrong shape is named, its value not shown.
    let out = cli(&data, &["config", "check"])
        .env("HEARTH_PUSH_SERVICES__FCM_SERVER_KEY", "[\"s3cr3t\"]")
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("HEARTH_PUSH_SERVICES__FCM_SERVER_KEY"),
        "{out}"
    );
    assert!(!out.contains("s3cr3t"), "{out}");
    // A time too long for the node is refused, naming its key.
    let out = cli(&data, &["config", "check"])
        .env(
            "HEARTH_WEBSOCKET__HEARTBEAT_INTERVAL",
            "10000000000000000000",
        )
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(
        String::from_utf8_lossy(&out).contains("websocket.heartbeat_interval"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn config_precedence_is_flags_then_environment_then_file_then_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("hearth.toml"),
        "[node]\nname = \"from-file\"\n[api]\naddr = \"127.0.0.1:5000\"\n",
    )
    .unwrap();
    // The environment's seed-style port wins over the file's api.addr (its host stays).
    let out = cli(&data, &["config", "check", "--json"])
        .env("HEARTH_AGENT__PORT", "6000")
        .env("HEARTH_NODE__NAME", "from-env")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let checked: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(checked["api"]["addr"], "127.0.0.1:6000", "{checked}");
    assert_eq!(checked["node"]["name"], "from-env");
    assert_eq!(
        checked["sources"]["node.name"]["from"],
        "env HEARTH_NODE__NAME"
    );
    assert_eq!(
        checked["sources"]["agent.port"]["from"],
        "env HEARTH_AGENT__PORT"
    );
    assert!(
        checked["sources"]["api.addr"]["from"]
            .as_str()
            .unwrap()
            .starts_with("file "),
        "{checked}"
    );
    assert_eq!(checked["sources"]["node.mdns"]["from"], "default");
    // The plain output says where each value came from too.
    let text = cli(&data, &["config", "check"])
        .env("HEARTH_NODE__NAME", "from-env")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.lines().any(
            |l| l.contains("node.name = \"from-env\"") && l.contains("# env HEARTH_NODE__NAME")
        ),
        "{text}"
    );
    // An unknown key in the environment is named as the variable.
    let out = cli(&data, &["config", "check"])
        .env("HEARTH_NODE__NAMEZ", "x")
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(String::from_utf8_lossy(&out).contains("HEARTH_NODE__NAMEZ"));

    // Without a file in the data dir, the defaults and the environment are checked; a file
    // that is named must exist.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = cli(&empty, &["config", "check", "--json"])
        .env("HEARTH_NODE__NAME", "from-env")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let checked: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(checked["file_exists"], false);
    assert_eq!(checked["node"]["name"], "from-env");
    let missing = empty.join("missing.toml");
    cli(&empty, &["config", "check", missing.to_str().unwrap()])
        .assert()
        .failure()
        .stderr(predicates::str::contains("no config file"));

    // A flag wins over the environment: `up --name` and `--api 127.0.0.1:0` against an
    // environment that names the device and the API otherwise.
    let mut child = crate::util::up_cmd(&data)
        .args(["--name", "from-flag"])
        .env("HEARTH_NODE__NAME", "from-env")
        .env("HEARTH_API__ADDR", "127.0.0.1:1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = crate::util::wait_until(|| std::fs::read_to_string(data.join("api.addr")).ok());
    assert!(!addr.trim().ends_with(":1"), "{addr}");
    let status = ok_json(&data, &["status", "--json"]);
    assert_eq!(status["device"], "from-flag", "{status}");
    crate::util::signal(child.id(), "TERM");
    assert!(crate::util::wait_exit(&mut child, WAIT).is_some_and(|s| s.success()));
}

#[test]
fn the_annotated_example_config_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hearth.toml");
    let checked = ok_json(
        dir.path(),
        &["config", "check", example.to_str().unwrap(), "--json"],
    );
    assert_eq!(checked["unused"], serde_json::json!([]), "{checked}");
    assert_eq!(checked["node"]["name"], "hall");
}

#[test]
fn version_names_the_git_commit_it_was_built_from() {
    let out = crate::util::run(hearth().arg("--version"));
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    // The commit build.rs read for this build (HEAD may have moved since).
    let commit = env!("HEARTH_GIT_COMMIT");
    assert_eq!(
        text.trim(),
        format!("hearth {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
    // In a checkout it is a commit of this repository, abbreviated to 12 digits.
    let in_checkout = std::process::Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .is_ok_and(|o| o.status.success());
    if in_checkout {
        assert_eq!(commit.len(), 12, "{commit}");
        let known = std::process::Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(known.success(), "{commit} is not a commit here");
    } else {
        assert_eq!(commit, "unknown");
    }
}
