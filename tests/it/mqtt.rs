//! The MQTT bridge against a real broker (rumqttd, in process, with a password), on
//! loopback: Home Assistant's discovery configs and retained states, a command from Home
//! Assistant written on another device of the home and back on the state topic, commands
//! to a read-only share refused and to a writable one written at its owner, entities
//! imported from Home Assistant's statestream, and a broker outage the bridge rides out.
//!
//! Home Assistant is played by a plain MQTT client that subscribes and publishes as it
//! does. The bridge reaches the broker through a TCP relay the test can cut, which is how
//! the broker "goes down" for it while the broker itself (and the retained messages and
//! the last will it holds) stays up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth::{Config, EntityWrite, MqttConfig, Node, Rights};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::util::free_port;

const T: Duration = Duration::from_secs(30);
const USER: &str = "hearth";
const PASSWORD: &str = "broker-secret";

/// rumqttd on a free loopback port, asking for [`USER`] and [`PASSWORD`].
fn start_broker() -> SocketAddr {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1024 * 1024,
        max_inflight_count: 100,
        auth: Some(HashMap::from([
            (USER.to_string(), PASSWORD.to_string()),
            ("ha".to_string(), "ha-secret".to_string()),
        ])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::spawn(move || {
        if let Err(error) = broker.start() {
            eprintln!("the broker stopped: {error}");
        }
    });
    // The broker binds on its own threads; wait until it accepts.
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

/// A TCP relay to the broker that the test can cut (every connection closed, the port
/// refusing) and restore on the same port.
struct Relay {
    port: u16,
    broker: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(broker: SocketAddr) -> Self {
        let relay = Self {
            port: free_port(),
            broker,
            tasks: Arc::default(),
        };
        relay.open().await;
        relay
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    async fn open(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let broker = self.broker;
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let conn = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Cuts every connection and stops accepting: the broker is down for the bridge.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Home Assistant's side: a client that keeps the last payload (and retain flag as first
/// received) of every topic it sees.
struct Ha {
    client: AsyncClient,
    seen: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    _task: JoinHandle<()>,
}

impl Ha {
    async fn connect(broker: SocketAddr, filters: &[&str]) -> Self {
        let mut options = MqttOptions::new("home-assistant", "127.0.0.1", broker.port());
        options.set_credentials("ha", "ha-secret");
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let seen: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        sink.lock()
                            .unwrap()
                            .insert(p.topic.clone(), p.payload.to_vec());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        timeout(T, ready).await.unwrap().unwrap();
        for filter in filters {
            client
                .subscribe(filter.to_string(), QoS::AtLeastOnce)
                .await
                .unwrap();
        }
        Self {
            client,
            seen,
            _task: task,
        }
    }

    fn get(&self, topic: &str) -> Option<Vec<u8>> {
        self.seen.lock().unwrap().get(topic).cloned()
    }

    /// Waits until `topic`'s last payload is `payload`.
    async fn wait(&self, topic: &str, payload: &str) {
        let deadline = Instant::now() + T;
        loop {
            if self.get(topic).as_deref() == Some(payload.as_bytes()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{topic} is {:?}, not {payload:?}",
                self.get(topic)
                    .map(|p| String::from_utf8_lossy(&p).into_owned())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `topic` to carry a JSON object, and returns it.
    async fn json(&self, topic: &str) -> Value {
        let deadline = Instant::now() + T;
        loop {
            if let Some(p) = self.get(topic).filter(|p| !p.is_empty()) {
                return serde_json::from_slice(&p)
                    .unwrap_or_else(|e| panic!("{topic}: {e}: {}", String::from_utf8_lossy(&p)));
            }
            assert!(Instant::now() < deadline, "nothing on {topic}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn publish(&self, topic: &str, payload: &str, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }
}

fn mqtt(url: String, node_id: &str) -> MqttConfig {
    let mut mqtt = MqttConfig::new(url);
    mqtt.user = Some(USER.into());
    mqtt.password = Some(PASSWORD.into());
    mqtt.node_id = Some(node_id.into());
    mqtt
}

fn with_mqtt(dir: &std::path::Path, name: &str, mqtt: MqttConfig) -> Config {
    Config {
        mqtt: Some(mqtt),
        ..crate::ws::config(dir, name)
    }
}

fn write(state: &str, attributes: Value) -> EntityWrite {
    EntityWrite {
        state: state.into(),
        attributes: attributes.as_object().cloned(),
        correlation_id: None,
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn state_of(node: &Node, id: &str) -> Option<String> {
    node.entities().get(id).await.unwrap().map(|e| e.state)
}

async fn wait_state(node: &Node, id: &str, state: &str) {
    let deadline = Instant::now() + T;
    loop {
        if state_of(node, id).await.as_deref() == Some(state) {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never became {state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovers_commands_and_imports_through_the_bridge() {
    crate::sharing::init_tracing();
    let broker = start_broker();
    let ha = Ha::connect(broker, &["homeassistant/#", "hearth/#"]).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();

    // Home 1: A runs the bridge, B is another device of the home.
    let mut config = mqtt(format!("mqtt://{broker}"), "house");
    config.import_prefix = Some("statestream".into());
    let a = timeout(T, Node::start(with_mqtt(dirs[0].path(), "a", config)))
        .await
        .unwrap()
        .unwrap();
    let b = crate::ws::join_and_start(&a, dirs[1].path(), "b").await;
    crate::ws::wait_admitted(&a, b.peer_id()).await;
    // Home 2 shares one entity read-only and one writable with home 1.
    let c = crate::sharing::start(dirs[2].path(), "c").await;
    crate::sharing::pair(&c, &a).await;
    c.entities()
        .set("switch.neighbour", write("off", json!({})))
        .await
        .unwrap();
    c.entities()
        .set("light.garden", write("off", json!({})))
        .await
        .unwrap();
    c.shares()
        .share("switch.neighbour", a.home_id(), Rights::Read, None)
        .await
        .unwrap();
    c.shares()
        .share("light.garden", a.home_id(), Rights::Write, None)
        .await
        .unwrap();

    // B makes the home's entities; they reach A, whose bridge publishes them.
    b.entities()
        .set(
            "light.porch",
            write("off", json!({"friendly_name": "Porch"})),
        )
        .await
        .unwrap();
    b.entities()
        .set(
            "sensor.hall_temp",
            write(
                "21.5",
                json!({"unit_of_measurement": "°C", "device_class": "temperature"}),
            ),
        )
        .await
        .unwrap();
    b.entities()
        .set("lock.front", write("locked", json!({})))
        .await
        .unwrap();

    ha.wait("hearth/house/availability", "online").await;
    let porch = ha.json("homeassistant/light/house/porch/config").await;
    assert_eq!(porch["~"], "hearth/house/light/porch");
    assert_eq!(porch["name"], "Porch");
    assert_eq!(porch["stat_t"], "~/state");
    assert_eq!(porch["cmd_t"], "~/set");
    assert_eq!(porch["json_attr_t"], "~/attributes");
    assert_eq!(porch["avty_t"], "hearth/house/availability");
    assert_eq!(porch["unique_id"], "hearth_house_light_porch");
    assert_eq!(porch["dev"]["ids"], json!(["hearth_house"]));
    let raw = ha.get("homeassistant/light/house/porch/config").unwrap();
    assert!(!raw.contains(&b'\n'), "a discovery config is one line");
    ha.wait("hearth/house/light/porch/state", "OFF").await;
    let attributes = ha.json("hearth/house/light/porch/attributes").await;
    assert_eq!(attributes["friendly_name"], "Porch");
    let sensor = ha.json("homeassistant/sensor/house/hall_temp/config").await;
    assert_eq!(sensor["unit_of_meas"], "°C");
    assert_eq!(sensor["dev_cla"], "temperature");
    assert!(sensor.get("cmd_t").is_none());
    ha.wait("hearth/house/sensor/hall_temp/state", "21.5").await;
    // Shared in from the other home: published too.
    ha.json("homeassistant/switch/house/neighbour/config").await;
    ha.json("homeassistant/light/house/garden/config").await;
    ha.wait("hearth/house/switch/neighbour/state", "OFF").await;

    // The round trip: Home Assistant turns the porch light on; the write lands on B,
    // another device of the home; B (the light itself) then reports it off with its
    // brightness, and Home Assistant sees that on the state topics.
    ha.publish("hearth/house/light/porch/set", "ON", false)
        .await;
    wait_state(&b, "light.porch", "on").await;
    ha.wait("hearth/house/light/porch/state", "ON").await;
    b.entities()
        .set(
            "light.porch",
            write("off", json!({"friendly_name": "Porch", "brightness": 12})),
        )
        .await
        .unwrap();
    ha.wait("hearth/house/light/porch/state", "OFF").await;
    let deadline = Instant::now() + T;
    while ha.json("hearth/house/light/porch/attributes").await["brightness"] != 12 {
        assert!(Instant::now() < deadline, "brightness never reached MQTT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.mqtt_status().unwrap().commands, 1);

    // A read-only share refuses the command, and the refusal is counted and logged; the
    // real state goes back on the state topic.
    ha.publish("hearth/house/switch/neighbour/set", "ON", false)
        .await;
    until("the read-only command refused", || {
        a.mqtt_status().unwrap().refused == 1
    })
    .await;
    assert_eq!(
        state_of(&a, "switch.neighbour").await.as_deref(),
        Some("off")
    );
    assert_eq!(
        state_of(&c, "switch.neighbour").await.as_deref(),
        Some("off")
    );
    ha.wait("hearth/house/switch/neighbour/state", "OFF").await;
    // A writable share takes it, at its owner.
    ha.publish("hearth/house/light/garden/set", "ON", false)
        .await;
    wait_state(&c, "light.garden", "on").await;
    // Malformed commands and commands to entities not exported are rejected.
    let rejected = a.mqtt_status().unwrap().rejected;
    ha.publish("hearth/house/light/porch/set", "BRIGHT", false)
        .await;
    ha.publish("hearth/house/lock/front/set", "ON", false).await;
    until("two commands rejected", || {
        a.mqtt_status().unwrap().rejected == rejected + 2
    })
    .await;
    assert_eq!(state_of(&b, "lock.front").await.as_deref(), Some("locked"));
    assert!(ha.get("homeassistant/lock/house/front/config").is_none());

    // HA -> Hearth: statestream's topics become an entity of this home, seen on B.
    ha.publish(
        "statestream/sensor/outdoor/unit_of_measurement",
        "\"°C\"",
        true,
    )
    .await;
    ha.publish("statestream/sensor/outdoor/state", "12", true)
        .await;
    wait_state(&b, "sensor.outdoor", "12").await;
    let outdoor = b.entities().get("sensor.outdoor").await.unwrap().unwrap();
    assert_eq!(outdoor.attributes["unit_of_measurement"], "°C");
    assert_eq!(outdoor.attributes[hearth::IMPORT_MARKER], "mqtt");
    assert_eq!(outdoor.owner, a.home_id().clone());
    // statestream echoing this home's own entity is not imported over it.
    ha.publish("statestream/light/porch/state", "on", false)
        .await;
    until("the echo refused", || {
        a.mqtt_status().unwrap().rejected == rejected + 3
    })
    .await;
    assert_eq!(state_of(&a, "light.porch").await.as_deref(), Some("off"));
    // An imported entity is not exported back to Home Assistant.
    let status = a.mqtt_status().unwrap();
    assert_eq!(status.imported, 1);
    assert_eq!(status.exported, 4, "{status:?}");
    assert!(
        ha.get("homeassistant/sensor/house/outdoor/config")
            .is_none()
    );

    // A deleted entity leaves Home Assistant: its config is cleared.
    b.entities().delete("sensor.hall_temp").await.unwrap();
    ha.wait("homeassistant/sensor/house/hall_temp/config", "")
        .await;

    // A clean stop says offline.
    timeout(T, a.shutdown()).await.unwrap().unwrap();
    ha.wait("hearth/house/availability", "offline").await;
    for node in [b, c] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_rides_out_a_broker_outage_and_republishes_on_return() {
    crate::sharing::init_tracing();
    let broker = start_broker();
    let relay = Relay::start(broker).await;
    let ha = Ha::connect(broker, &["homeassistant/#", "hearth/#"]).await;
    // A config an earlier run left retained, for an entity that is gone since.
    ha.publish(
        "homeassistant/switch/outage/old/config",
        r#"{"~":"hearth/outage/switch/old","name":"old"}"#,
        true,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let node = timeout(
        T,
        Node::start(with_mqtt(dir.path(), "a", mqtt(relay.url(), "outage"))),
    )
    .await
    .unwrap()
    .unwrap();
    node.entities()
        .set("switch.fan", write("off", json!({})))
        .await
        .unwrap();
    ha.wait("hearth/outage/switch/fan/state", "OFF").await;
    ha.wait("hearth/outage/availability", "online").await;
    assert_eq!(node.mqtt_status().unwrap().connections, 1);
    ha.wait("homeassistant/switch/outage/old/config", "").await;

    // The broker goes away for the bridge: the broker publishes its last will, and the node
    // keeps taking writes.
    relay.cut();
    ha.wait("hearth/outage/availability", "offline").await;
    until("the bridge sees the outage", || {
        !node.mqtt_status().unwrap().connected
    })
    .await;
    node.entities()
        .set("switch.fan", write("on", json!({})))
        .await
        .unwrap();
    node.entities()
        .set("light.new", write("on", json!({})))
        .await
        .unwrap();
    assert_eq!(state_of(&node, "switch.fan").await.as_deref(), Some("on"));

    // Back: it reconnects on its own and publishes what changed meanwhile.
    relay.open().await;
    until("the bridge reconnects", || {
        node.mqtt_status().unwrap().connections == 2
    })
    .await;
    ha.wait("hearth/outage/availability", "online").await;
    ha.wait("hearth/outage/switch/fan/state", "ON").await;
    ha.json("homeassistant/light/outage/new/config").await;
    ha.wait("hearth/outage/light/new/state", "ON").await;
    // And commands work again.
    ha.publish("hearth/outage/switch/fan/set", "OFF", false)
        .await;
    wait_state(&node, "switch.fan", "off").await;
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bridge_settings_stop_the_node_from_starting_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = MqttConfig::new("mqtts://broker:8883");
    bad.node_id = Some("x".into());
    let error = Node::start(with_mqtt(dir.path(), "a", bad))
        .await
        .err()
        .expect("a TLS URL is refused")
        .to_string();
    assert!(error.contains("TLS"), "{error}");
    // A broker that is not there does not keep the node from starting and working.
    let port = free_port();
    let node = timeout(
        T,
        Node::start(with_mqtt(
            dir.path(),
            "a",
            mqtt(format!("mqtt://127.0.0.1:{port}"), "nobroker"),
        )),
    )
    .await
    .unwrap()
    .unwrap();
    node.entities()
        .set("switch.fan", write("on", json!({})))
        .await
        .unwrap();
    assert!(!node.mqtt_status().unwrap().connected);
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearth_up_takes_the_broker_from_its_flags_and_keeps_the_password_out_of_sight() {
    let broker = start_broker();
    let ha = Ha::connect(broker, &["homeassistant/#", "hearth/#"]).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    std::fs::create_dir_all(&data).unwrap();
    let password = dir.path().join("mqtt.password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let url = format!("mqtt://{broker}");
    let flags = [
        "--mqtt",
        url.as_str(),
        "--mqtt-user",
        USER,
        "--mqtt-password-file",
        password.to_str().unwrap(),
    ];
    // `config check` shows the bridge's settings, the password only as set.
    let mut check = crate::util::hearth();
    check
        .args(["config", "check", "--json", "--data"])
        .arg(&data);
    std::fs::write(
        data.join("hearth.toml"),
        format!(
            "[mqtt]\nurl = \"{url}\"\nuser = \"{USER}\"\npassword_file = \"{}\"\nnode_id = \"checked\"\n",
            password.display()
        ),
    )
    .unwrap();
    let out = crate::util::run(&mut check);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(PASSWORD), "{text}");
    let summary: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(summary["mqtt"]["node_id"], "checked");
    assert_eq!(summary["mqtt"]["password"], "<set>");
    assert_eq!(
        summary["sources"]["mqtt.url"]["from"],
        format!("file {}", data.join("hearth.toml").display())
    );
    assert_eq!(
        summary["sources"]["mqtt.discovery_prefix"]["from"],
        "default"
    );
    // The environment layers over the file, and the plain output hides the password too.
    let mut check = crate::util::hearth();
    check
        .args(["config", "check", "--data"])
        .arg(&data)
        .env("HEARTH_MQTT__USER", "from-env")
        .env("HEARTH_MQTT__PASSWORD_FILE", &password);
    let out = crate::util::run(&mut check);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(text.contains("as from-env (password <set>)"), "{text}");
    assert!(
        text.lines().any(
            |l| l.contains("mqtt.user = \"from-env\"") && l.contains("# env HEARTH_MQTT__USER")
        ),
        "{text}"
    );
    std::fs::remove_file(data.join("hearth.toml")).unwrap();

    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    let mut up = tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        crate::util::UpProcess::start_with(&data, &flags)
    })
    .await
    .unwrap();
    // The node id comes from the PeerId: `hearth_` and its last 10 characters.
    let tail: String = up
        .peer_id
        .chars()
        .rev()
        .take(10)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let node_id = format!("hearth_{}", tail.to_ascii_lowercase());
    ha.wait(&format!("hearth/{node_id}/availability"), "online")
        .await;
    let status = tokio::task::spawn_blocking(move || up.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    ha.wait(&format!("hearth/{node_id}/availability"), "offline")
        .await;
}
