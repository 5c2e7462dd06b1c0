//! The MQTT bridge to Home Assistant: a headless node (loopback, mDNS off, a temporary data
//! dir) publishes a light with Home Assistant's discovery on a broker, a client playing Home
//! Assistant prints what it reads and turns the light off, and the node prints the write.
//!
//! Without an argument it runs its own broker (rumqttd) on a free loopback port; with one it
//! uses that broker, which must allow anonymous clients.
//!
//! ```text
//! cargo run --example mqtt_bridge [mqtt://127.0.0.1:1883]
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use hearth::{EntityWrite, Event, EventItem, MqttConfig, Node};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

/// rumqttd on a free loopback port, without passwords.
fn local_broker() -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 16,
            max_outgoing_packet_count: 200,
            max_segment_size: 10 * 1024 * 1024,
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
            eprintln!("broker: {error}");
        }
    });
    while std::net::TcpStream::connect(addr).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(addr)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = match std::env::args().nth(1) {
        Some(url) => url,
        None => format!("mqtt://{}", local_broker()?),
    };
    let (host, port) = url
        .trim_start_matches("mqtt://")
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("give the broker as mqtt://host:port"))?;

    let dir = tempfile::tempdir()?;
    let mut mqtt = MqttConfig::new(url.clone());
    mqtt.node_id = Some("example".into());
    let node = Node::builder()
        .data_dir(dir.path())
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
        .mqtt(mqtt)
        .start()
        .await?;
    let on = EntityWrite {
        state: "on".into(),
        ..EntityWrite::default()
    };
    node.entities().set("light.porch", on).await?;

    // Home Assistant's side: read the discovery config and the state, then send a command.
    let (ha, mut eventloop) = AsyncClient::new(MqttOptions::new("ha", host, port.parse()?), 16);
    ha.subscribe("homeassistant/light/example/#", QoS::AtLeastOnce)
        .await?;
    ha.subscribe("hearth/example/light/porch/state", QoS::AtLeastOnce)
        .await?;
    let mut events = node.events();
    let mut sent = false;
    let mut config_seen = false;
    let mut state_seen = false;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::select! {
                event = eventloop.poll() => {
                    if let Ok(MqttEvent::Incoming(Packet::Publish(p))) = event {
                        println!("{} {}", p.topic, String::from_utf8_lossy(&p.payload));
                        config_seen |= p.topic.ends_with("/config");
                        state_seen |= p.topic.ends_with("/state");
                        if config_seen && state_seen && !sent {
                            ha.publish("hearth/example/light/porch/set", QoS::AtLeastOnce, false, "OFF")
                                .await?;
                            sent = true;
                        }
                    }
                }
                item = events.next() => {
                    if let Some(EventItem::Event(Event::Entity(change))) = item
                        && change.entity.state == "off"
                    {
                        println!("Home Assistant turned {} off", change.entity.id);
                        return Ok::<_, anyhow::Error>(());
                    }
                }
            }
        }
    })
    .await??;
    node.shutdown().await?;
    Ok(())
}
