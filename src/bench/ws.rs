//! The `ws` scenario: seed 001's benchmark table, run with real WebSocket clients against
//! the node's `/ws/{user_id}` and its REST routes, on one node and between two devices of
//! a home. Each row is reported next to the seed's own claim (measured on 4 cores) as its
//! baseline; the target is to beat it. Rates are operations a second over the row's wall
//! time, latencies are from sending to the last expected frame arriving.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::Sizes;
use super::cluster::{self, Device, Scratch, converge};
use super::floor::p50_95_99;
use super::report::{Figure, ScenarioReport};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long any one expected frame may take before the row fails.
const WAIT: Duration = Duration::from_secs(30);
/// Requests in flight at once in the pipelined rows.
const IN_FLIGHT: usize = 16;

/// The seed's claims: (row, ops/s, p95 ms).
const SEED: [(&str, f64, f64); 5] = [
    ("connect", 1000.0, 5.0),
    ("message", 5000.0, 2.0),
    ("state sync", 2000.0, 8.0),
    ("notification", 1000.0, 15.0),
    ("room broadcast (10 users)", 500.0, 20.0),
];

/// A device with its API on loopback.
pub(super) struct Served {
    pub(super) device: Device,
    pub(super) api: String,
    pub(super) token: String,
    /// One HTTP client for every REST call, keeping its connections open.
    http: ureq::Agent,
}

pub(super) async fn serve(
    scratch: &mut Scratch,
    first: Option<&Served>,
    name: &str,
) -> Result<Served> {
    let dir = scratch.dir(name);
    let mut config = cluster::config(&dir, name, hearth::DEFAULT_BATCH_WINDOW);
    config.api = Some(hearth::ApiConfig::on("127.0.0.1:0".parse()?));
    // The connect row opens many clients for few users.
    config.users.max_devices_per_user = 64;
    if let Some(first) = first {
        let invite = first.device.node.invite(Duration::from_secs(600)).await?;
        hearth::Node::join(&invite.code, &config)
            .await
            .with_context(|| format!("{name} could not join"))?;
    }
    let node = hearth::Node::start(config).await?;
    let api = node.api_addr().context("no API")?.to_string();
    let token = std::fs::read_to_string(dir.join(hearth::TOKEN_FILE))?
        .trim()
        .to_string();
    Ok(Served {
        device: Device {
            name: name.into(),
            dir,
            window: hearth::DEFAULT_BATCH_WINDOW,
            node,
        },
        api,
        token,
        http: ureq::Agent::config_builder()
            .timeout_global(Some(WAIT))
            .build()
            .into(),
    })
}

async fn connect(s: &Served, user: &str, client: &str) -> Result<Socket> {
    let url = format!(
        "ws://{}/ws/{user}?device_id={client}&token={}",
        s.api, s.token
    );
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .context("connect timed out")??;
    let first = next(&mut ws).await?;
    if first["type"] != "connected" {
        bail!("expected connected, got {first}");
    }
    Ok(ws)
}

async fn next(ws: &mut Socket) -> Result<Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => bail!("the socket ended: {other:?}"),
            Err(_) => bail!("no frame within {WAIT:?}"),
        }
    }
}

async fn next_of(ws: &mut Socket, kind: &str) -> Result<Value> {
    loop {
        let v = next(ws).await?;
        if v["type"] == kind {
            return Ok(v);
        }
    }
}

async fn send(ws: &mut Socket, kind: &str, data: Value) -> Result<()> {
    ws.send(Message::Text(
        json!({ "type": kind, "data": data }).to_string().into(),
    ))
    .await?;
    Ok(())
}

/// A REST call (blocking client, off the async threads).
async fn rest(s: &Served, path: &str, body: Value) -> Result<Value> {
    rest_call(s, path, body).await
}

/// A REST call that owns what it needs, so it can run as its own task.
fn rest_call(
    s: &Served,
    path: &str,
    body: Value,
) -> impl std::future::Future<Output = Result<Value>> + Send + 'static {
    let url = format!("http://{}{path}", s.api);
    let token = s.token.clone();
    let agent = s.http.clone();
    async move {
        tokio::task::spawn_blocking(move || -> Result<Value> {
            let mut r = agent
                .post(&url)
                .header("Authorization", &format!("Bearer {token}"))
                .send_json(&body)?;
            Ok(r.body_mut().read_json()?)
        })
        .await?
    }
}

/// Fails on the first REST call of `calls` that ended with an error.
fn check_calls(calls: &mut tokio::task::JoinSet<Result<Value>>) -> Result<()> {
    while let Some(done) = calls.try_join_next() {
        done??;
    }
    Ok(())
}

/// Ops a second over `elapsed`.
fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The two figures of a row, against the seed's claim.
fn row(report: ScenarioReport, name: &str, ops: f64, lat: &mut [Duration]) -> ScenarioReport {
    let (_, claim_rate, claim_p95_ms) = SEED
        .iter()
        .find(|(n, _, _)| *n == name)
        .copied()
        .unwrap_or((name, 0.0, 0.0));
    let (_, p95, _) = p50_95_99(lat);
    report
        .figure(
            Figure::new(format!("{name} rate"), ops, "ops/s")
                .baseline("seed 001's claim (4 cores)", claim_rate)
                .target("beats the seed", ops >= claim_rate),
        )
        .figure(
            Figure::new(format!("{name} p95"), p95, "us")
                .baseline("seed 001's claim (4 cores)", claim_p95_ms * 1000.0)
                .target("beats the seed", p95 <= claim_p95_ms * 1000.0),
        )
}

/// Runs the `ws` scenario.
pub(crate) async fn ws(scratch: &mut Scratch, sizes: &Sizes) -> Result<Vec<ScenarioReport>> {
    let (sockets, messages) = if sizes.quick { (50, 100) } else { (1000, 2000) };
    let a = serve(scratch, None, "a").await?;
    let b = serve(scratch, Some(&a), "b").await?;
    // The users document comes from a (the admin); b serves users once it has it.
    let deadline = Instant::now() + WAIT;
    while b.device.node.users().state("probe").await.is_err() {
        if Instant::now() > deadline {
            bail!("b never received the users document");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut report = ScenarioReport::new(
        "ws",
        format!("{sockets} sockets, {messages} messages, two devices"),
        Vec::new(),
    );

    // Connect: `sockets` clients (a user per 32 clients), IN_FLIGHT at a time.
    let mut connect_lat = Vec::with_capacity(sockets);
    let mut open = Vec::with_capacity(sockets);
    let started = Instant::now();
    for chunk in (0..sockets).collect::<Vec<_>>().chunks(IN_FLIGHT) {
        let tries = chunk.iter().map(|i| {
            let (user, client) = (format!("u{}", i / 32), format!("c{i}"));
            let a = &a;
            async move {
                let t = Instant::now();
                connect(a, &user, &client).await.map(|ws| (ws, t.elapsed()))
            }
        });
        for done in futures::future::join_all(tries).await {
            let (ws, us) = done?;
            connect_lat.push(us);
            open.push(ws);
        }
    }
    let connect_rate = rate(sockets, started.elapsed());
    report = row(report, "connect", connect_rate, &mut connect_lat);
    for mut ws in open {
        let _ = ws.close(None).await;
    }

    // Each row starts once both devices hold the same state: no row pays for the
    // previous one's backlog.
    converge(&[&a.device, &b.device]).await?;
    // Message: alice sends, bob (same room, same device) receives each.
    let room = rest(
        &a,
        "/create-room",
        json!({"room_name": "bench", "creator_id": "alice", "max_size": 50}),
    )
    .await?["room_id"]
        .as_str()
        .context("no room id")?
        .to_string();
    rest(&a, "/join-room", json!({"room_id": room, "user_id": "bob"})).await?;
    let mut alice = connect(&a, "alice", "w").await?;
    let mut bob = connect(&a, "bob", "w").await?;
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut msg_lat = Vec::with_capacity(messages);
    let started = Instant::now();
    let mut next_send = 0;
    while msg_lat.len() < messages {
        while next_send < messages && sent_at.len() < IN_FLIGHT {
            let text = format!("m{next_send}");
            sent_at.insert(text.clone(), Instant::now());
            send(
                &mut alice,
                "send_message",
                json!({"room_id": room, "message": text}),
            )
            .await?;
            next_send += 1;
        }
        let got = next_of(&mut bob, "chat_message").await?;
        if let Some(t) = got["message"].as_str().and_then(|m| sent_at.remove(m)) {
            msg_lat.push(t.elapsed());
        }
    }
    report = row(
        report,
        "message",
        rate(messages, started.elapsed()),
        &mut msg_lat,
    );

    converge(&[&a.device, &b.device]).await?;
    // State sync: carol's client on a writes, her client on b hears it.
    let mut web = connect(&a, "carol", "web").await?;
    let mut phone = connect(&b, "carol", "phone").await?;
    let syncs = messages / 2;
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut sync_lat = Vec::with_capacity(syncs);
    let started = Instant::now();
    let mut next_send = 0u64;
    while sync_lat.len() < syncs {
        while (next_send as usize) < syncs && pending.len() < IN_FLIGHT {
            pending.insert(next_send, Instant::now());
            send(&mut web, "sync_state", json!({"state": {"n": next_send}})).await?;
            next_send += 1;
        }
        let got = next_of(&mut phone, "state_update").await?;
        // Updates may coalesce: one that carries n settles every write up to n.
        if let Some(n) = got["data"]["state"]["n"].as_u64() {
            let done: Vec<u64> = pending.keys().copied().filter(|k| *k <= n).collect();
            for k in done {
                if let Some(t) = pending.remove(&k) {
                    sync_lat.push(t.elapsed());
                }
            }
        }
    }
    report = row(
        report,
        "state sync",
        rate(syncs, started.elapsed()),
        &mut sync_lat,
    );

    converge(&[&a.device, &b.device]).await?;
    // Notification: POST /notify (IN_FLIGHT calls at once), the user's socket gets each.
    let mut dave = connect(&a, "dave", "w").await?;
    let notes = (messages / 10).max(20);
    let mut note_lat = Vec::with_capacity(notes);
    let mut calls = tokio::task::JoinSet::new();
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let started = Instant::now();
    let mut next_send = 0;
    while note_lat.len() < notes {
        while next_send < notes && sent_at.len() < IN_FLIGHT {
            let title = format!("n{next_send}");
            sent_at.insert(title.clone(), Instant::now());
            calls.spawn(rest_call(
                &a,
                "/notify",
                json!({"user_id": "dave", "type": "peer_message", "title": title, "ttl": 60}),
            ));
            next_send += 1;
        }
        let got = next_of(&mut dave, "notification").await?;
        if let Some(t) = got["data"]["title"]
            .as_str()
            .and_then(|title| sent_at.remove(title))
        {
            note_lat.push(t.elapsed());
        }
        check_calls(&mut calls)?;
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    report = row(
        report,
        "notification",
        rate(notes, started.elapsed()),
        &mut note_lat,
    );

    converge(&[&a.device, &b.device]).await?;
    // Room broadcast to a 10-user room: every member's socket gets it.
    let members: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let big = rest(
        &a,
        "/create-room",
        json!({"room_name": "ten", "creator_id": members[0], "max_size": 50}),
    )
    .await?["room_id"]
        .as_str()
        .context("no room id")?
        .to_string();
    let mut member_sockets = Vec::new();
    for m in &members {
        rest(&a, "/join-room", json!({"room_id": big, "user_id": m})).await?;
        member_sockets.push(connect(&a, m, "w").await?);
    }
    // IN_FLIGHT broadcasts at once; each is done when every member's socket has it.
    let casts = (messages / 20).max(10);
    let mut cast_lat = Vec::with_capacity(casts);
    let mut heard = futures::stream::select_all(member_sockets.iter_mut());
    let mut waiting: HashMap<String, (Instant, usize)> = HashMap::new();
    let mut calls = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut next_send = 0;
    while cast_lat.len() < casts {
        while next_send < casts && waiting.len() < IN_FLIGHT {
            let text = format!("b{next_send}");
            waiting.insert(text.clone(), (Instant::now(), 0));
            calls.spawn(rest_call(
                &a,
                &format!("/broadcast/{big}"),
                json!({"message": {"text": text}, "sender_id": members[0]}),
            ));
            next_send += 1;
        }
        let got = match tokio::time::timeout(WAIT, heard.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t)?,
            Ok(Some(Ok(_))) => continue,
            Ok(other) => bail!("a member's socket ended: {other:?}"),
            Err(_) => bail!("no broadcast within {WAIT:?}"),
        };
        if got["type"] != "chat_message" {
            continue;
        }
        let Some(text) = got["message"].as_str() else {
            continue;
        };
        if let Some((at, count)) = waiting.get_mut(text) {
            *count += 1;
            if *count == members.len() {
                cast_lat.push(at.elapsed());
                waiting.remove(text);
            }
        }
        check_calls(&mut calls)?;
    }
    drop(heard);
    while let Some(done) = calls.join_next().await {
        done??;
    }
    report = row(
        report,
        "room broadcast (10 users)",
        rate(casts, started.elapsed()),
        &mut cast_lat,
    );

    for ws in [&mut alice, &mut bob, &mut web, &mut phone, &mut dave] {
        let _ = ws.close(None).await;
    }
    for mut ws in member_sockets {
        let _ = ws.close(None).await;
    }
    let nodes = converge(&[&a.device, &b.device]).await?;
    let mut done = ScenarioReport::new("ws", report.variant.clone(), nodes);
    done.figures = report.figures;
    for s in [b, a] {
        let (_, dir) = s.device.stop().await?;
        scratch.discard(&dir);
    }
    Ok(vec![done])
}
