//! Helpers for driving `hearth` processes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Generous limit for anything a test waits on; the machines are shared and noisy.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A `hearth` command with a clean environment for the variables the CLI reads.
pub(crate) fn hearth() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
    for var in [
        "HEARTH_DATA",
        "HEARTH_API",
        "HEARTH_TOKEN",
        "HEARTH_PASSPHRASE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// `hearth up` on DATA, on loopback with mDNS off and a free API port, as every test runs it.
pub(crate) fn up_cmd(data: &Path) -> Command {
    let mut cmd = hearth();
    cmd.args([
        "up",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--api",
        "127.0.0.1:0",
        "--data",
    ])
    .arg(data);
    cmd
}

/// A `hearth up` child on a free API port, killed on drop if still running.
pub(crate) struct UpProcess {
    pub(crate) child: Child,
    /// The PeerId the node printed on stdout.
    pub(crate) peer_id: String,
    pub(crate) api: String,
}

impl UpProcess {
    /// Starts `hearth up --data DIR --api 127.0.0.1:0` and waits until it prints its
    /// PeerId and publishes `api.addr`.
    pub(crate) fn start(data: &Path) -> Self {
        Self::start_with(data, &[])
    }

    /// Like [`UpProcess::start`], with extra `hearth up` arguments.
    pub(crate) fn start_with(data: &Path, extra: &[&str]) -> Self {
        let mut child = up_cmd(data)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(match std::env::var_os("HEARTH_TEST_LOG_DIR") {
                // Debugging aid: keep each node's log beside the others.
                Some(d) => Stdio::from(
                    std::fs::File::create(std::path::Path::new(&d).join(format!(
                        "{}.log",
                        data.file_name().and_then(|n| n.to_str()).unwrap_or("node")
                    )))
                    .expect("create log file"),
                ),
                None => Stdio::null(),
            })
            .spawn()
            .expect("spawn hearth up");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first).expect("read first line");
        // Keep draining, so the node never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let peer_id = first
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("unexpected first line: {first:?}"))
            .to_string();
        let addr_file = data.join("api.addr");
        let api = wait_until(|| std::fs::read_to_string(&addr_file).ok())
            .trim()
            .to_string();
        Self {
            child,
            peer_id,
            api,
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        wait_exit(&mut self.child, WAIT).expect("node did not exit after SIGTERM")
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP port that was free a moment ago, for a node that must come back on
/// the same address after a restart.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Sends a signal by name with the system `kill`.
pub(crate) fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Polls a child for exit until `limit`.
pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Polls `f` until it yields a value, panicking after [`WAIT`].
pub(crate) fn wait_until<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion with a bounded wait.
pub(crate) fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("wait for output"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("command did not finish within {WAIT:?}");
        }
    }
}

/// An HTTP GET against a node's API, returning status and body text.
pub(crate) fn http_get(api: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(WAIT))
        .build()
        .into();
    let mut req = agent.get(format!("http://{api}{path}"));
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.call().expect("http request");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().expect("body"))
}

/// An HTTP request with a JSON body (empty for none), returning status and body text.
pub(crate) fn http_send(
    api: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(WAIT))
        .build()
        .into();
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://{api}{path}"))
        .header("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let req = req.body(body.to_string()).expect("request");
    let mut resp = agent.run(req).expect("http request");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().expect("body"))
}
