//! The bridge's driver: one task polls the MQTT connection (and reconnects with a backoff
//! when the broker is down), another follows the node's events and the broker's messages.
//!
//! The poller never waits on the bridge: messages it cannot hand over at once are dropped
//! and counted, and the connection state travels on a watch channel. So a bridge busy with
//! a write never stops the connection's keep-alive, and the bridge waiting on a full
//! request queue never stops the poller that drains it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ha::{self, Command, Topics};
use super::import::{self, Importer};
use super::{Checked, Running, Stats};
use crate::{Entities, Entity, EntityWrite, Error, Event, EventItem, Events};

/// Requests (publishes, subscriptions) that may wait for the connection.
const REQUEST_CAPACITY: usize = 256;
/// Messages from the broker that may wait for the bridge; more are dropped and counted.
const INCOMING_CAPACITY: usize = 256;
/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long imported messages gather before they are written together.
const IMPORT_FLUSH: Duration = Duration::from_millis(100);
/// Most imported entities written per flush: with [`IMPORT_FLUSH`], 500 writes a second
/// at most, whatever the broker sends; the rest fold into later flushes.
const IMPORT_WRITES_PER_FLUSH: usize = 50;
/// Commands written per second on average, and in a burst; more are rejected and counted.
const COMMANDS_PER_SECOND: f64 = 20.0;
const COMMAND_BURST: f64 = 50.0;
/// Home Assistant's birth message republishes everything at most this often.
const REPUBLISH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a clean stop waits to tell the broker this node is offline.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// The link's state, as the poller sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Link {
    connected: bool,
    /// Connections made so far; each new one gets a full publish.
    connections: u64,
}

/// Starts the bridge for a node. It runs until `cancel`.
pub(crate) fn spawn(
    checked: Checked,
    entities: Entities,
    events: Events,
    device_name: &str,
    cancel: CancellationToken,
) -> Running {
    let stats = Arc::new(Stats {
        node_id: checked.node_id.clone(),
        ..Stats::default()
    });
    let topics = Topics::new(&checked.discovery_prefix, &checked.node_id);
    let mut options = MqttOptions::new(
        format!("hearth-{}", checked.node_id),
        checked.host.clone(),
        checked.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(super::MAX_MQTT_PACKET, crate::MAX_ATTRIBUTES_BYTES + 4096)
        .set_last_will(LastWill::new(
            topics.availability(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    if let Some((user, password)) = &checked.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let (link_tx, link_rx) = watch::channel(Link::default());
    let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_CAPACITY);
    let stop_polling = CancellationToken::new();
    let span = tracing::error_span!("mqtt", node_id = %checked.node_id);
    let poller = tokio::spawn(
        poll(
            eventloop,
            link_tx,
            incoming_tx,
            stats.clone(),
            stop_polling.clone(),
            cancel.clone(),
        )
        .instrument(span.clone()),
    );
    let bridge = Bridge {
        device: ha::device(&topics, device_name),
        importer: checked
            .import_prefix
            .as_deref()
            .map(|p| Importer::new(p, checked.max_imported)),
        topics,
        export: checked.export,
        client,
        entities,
        stats: stats.clone(),
        published: HashMap::new(),
        native: HashSet::new(),
        synced: 0,
        connected: false,
        commands: TokenBucket::new(COMMANDS_PER_SECOND, COMMAND_BURST),
        last_full: None,
    };
    let task = tokio::spawn(
        async move {
            bridge
                .run(events, link_rx, incoming_rx, cancel, stop_polling)
                .await;
            let _ = poller.await;
        }
        .instrument(span),
    );
    Running { stats, task }
}

/// Polls the connection until `stop`: hands over the broker's messages, reports the link's
/// state, and after an error waits (doubling up to [`MAX_BACKOFF`]) before the next poll
/// dials again.
///
/// The bridge cancels `stop` once it has queued its goodbye. Should the bridge itself be
/// stuck (waiting on a full request queue while the broker is away), the node's `cancel`
/// ends polling after [`STOP_TIMEOUT`] anyway; dropping the event loop then fails the
/// bridge's pending publish, which frees it to stop too.
async fn poll(
    mut eventloop: rumqttc::EventLoop,
    link: watch::Sender<Link>,
    incoming: mpsc::Sender<rumqttc::Publish>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    cancel: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    let mut dropped = 0u64;
    let mut failures = 0u64;
    let deadline = async {
        cancel.cancelled().await;
        tokio::time::sleep(STOP_TIMEOUT).await;
    };
    tokio::pin!(deadline);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            _ = &mut deadline => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                backoff = MIN_BACKOFF;
                failures = 0;
                stats.connected.store(true, Ordering::Relaxed);
                stats.connections.fetch_add(1, Ordering::Relaxed);
                link.send_modify(|l| {
                    l.connected = true;
                    l.connections += 1;
                });
                tracing::info!("connected to the MQTT broker");
            }
            Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                if incoming.try_send(publish).is_err() {
                    dropped += 1;
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    // Log the first and then every thousandth, so a flood does not flood
                    // the log too.
                    if dropped % 1000 == 1 {
                        tracing::warn!(dropped, "MQTT messages dropped: the bridge is behind");
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                failures += 1;
                if link.borrow().connected {
                    tracing::warn!(%error, "lost the MQTT broker; reconnecting");
                } else if failures % 20 == 1 {
                    // The first failure of a streak, and then every twentieth (about every
                    // 10 minutes at the longest backoff): a wrong password or address shows,
                    // without a line per retry.
                    tracing::warn!(%error, ?backoff, failures, "cannot reach the MQTT broker; retrying");
                } else {
                    tracing::debug!(%error, ?backoff, "MQTT broker unreachable; retrying");
                }
                stats.connected.store(false, Ordering::Relaxed);
                link.send_modify(|l| l.connected = false);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = &mut deadline => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    // A clean stop: the bridge queued `offline` and a disconnect; send them, briefly.
    if link.borrow().connected {
        let _ = tokio::time::timeout(STOP_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    stats.connected.store(false, Ordering::Relaxed);
}

struct Bridge {
    topics: Topics,
    device: serde_json::Value,
    export: Vec<crate::bus::Pattern>,
    importer: Option<Importer>,
    client: AsyncClient,
    entities: Entities,
    stats: Arc<Stats>,
    /// Exported entities and the discovery config last published for each.
    published: HashMap<String, String>,
    /// Entities of this home (or shared with it) that the bridge did not import: statestream
    /// echoing these back is not imported over them.
    native: HashSet<String>,
    /// The connection the last full publish was for.
    synced: u64,
    connected: bool,
    /// The rate the broker may make this node write at.
    commands: TokenBucket,
    /// When everything was last published.
    last_full: Option<tokio::time::Instant>,
}

/// A token bucket: `rate` a second on average, `burst` at once.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self, now: tokio::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a publish did not go out: the node stops, or the client's queue closed.
type Sent = Result<(), rumqttc::ClientError>;

impl Bridge {
    async fn run(
        mut self,
        mut events: Events,
        mut link: watch::Receiver<Link>,
        mut incoming: mpsc::Receiver<rumqttc::Publish>,
        cancel: CancellationToken,
        stop_polling: CancellationToken,
    ) {
        let mut flush = tokio::time::interval(IMPORT_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = link.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = *link.borrow_and_update();
                    self.connected = now.connected;
                    if now.connected && now.connections != self.synced {
                        self.synced = now.connections;
                        if let Err(error) = self.publish_all().await {
                            tracing::warn!(%error, "MQTT publish failed; retrying on reconnection");
                        }
                    }
                }
                message = incoming.recv() => match message {
                    Some(message) => self.on_message(message).await,
                    None => break,
                },
                event = events.next() => match event {
                    Some(EventItem::Event(event)) => self.on_event(event).await,
                    // Events were missed: read everything afresh.
                    Some(EventItem::Missed(_)) => {
                        if self.connected {
                            let _ = self.publish_all().await;
                        }
                    }
                    None => break,
                },
                _ = flush.tick(), if self.importer.as_ref().is_some_and(Importer::has_writes) => {
                    self.flush_imports().await;
                }
            }
        }
        // Stopping: say so, and leave cleanly (a clean disconnect sends no last will).
        if self.connected {
            let _ = self.client.try_publish(
                self.topics.availability(),
                QoS::AtLeastOnce,
                true,
                "offline",
            );
            let _ = self.client.try_disconnect();
        }
        stop_polling.cancel();
    }

    fn exported(&self, entity: &Entity) -> bool {
        let id = entity.id.as_str();
        ha::component(id).is_some()
            && !import::is_imported(&entity.attributes)
            && self.export.iter().any(|p| p.matches(id))
    }

    async fn publish(&self, topic: String, payload: impl Into<Vec<u8>>) -> Sent {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.into())
            .await
    }

    /// Publishes one exported entity: its discovery config (when new or changed), state
    /// and attributes, all retained.
    async fn publish_entity(&mut self, entity: &Entity) -> Sent {
        let id = entity.id.as_str();
        let (Some(config_topic), Some(config)) = (
            self.topics.config(id),
            ha::discovery_config(&self.topics, &self.device, entity),
        ) else {
            return Ok(());
        };
        // State first: Home Assistant reads the retained state as it subscribes, which it
        // does on reading the config.
        self.publish(self.topics.state(id), ha::state_payload(entity))
            .await?;
        self.publish(self.topics.attributes(id), ha::attributes_payload(entity))
            .await?;
        if self.published.get(id) != Some(&config) {
            self.publish(config_topic, config.clone()).await?;
            self.published.insert(id.to_string(), config);
        }
        self.stats
            .exported
            .store(self.published.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Takes an entity out of Home Assistant: empty retained payloads clear its config
    /// (which removes it there) and its state topics.
    async fn unpublish(&mut self, id: &str) -> Sent {
        self.published.remove(id);
        self.stats
            .exported
            .store(self.published.len(), Ordering::Relaxed);
        if let Some(topic) = self.topics.config(id) {
            self.publish(topic, Vec::new()).await?;
        }
        self.publish(self.topics.state(id), Vec::new()).await?;
        self.publish(self.topics.attributes(id), Vec::new()).await
    }

    /// After each (re)connection, a Missed event, or Home Assistant coming online: every
    /// exported entity afresh, the ones no longer exported taken out, then availability and
    /// the subscriptions.
    async fn publish_all(&mut self) -> Sent {
        self.last_full = Some(tokio::time::Instant::now());
        let list = match self.entities.list().await {
            Ok(list) => list,
            Err(error) => {
                tracing::warn!(%error, "cannot list entities for MQTT");
                return Ok(());
            }
        };
        self.native = list
            .iter()
            .filter(|e| !import::is_imported(&e.attributes))
            .map(|e| e.id.to_string())
            .collect();
        let mut keep = HashSet::new();
        for entity in &list {
            if self.exported(entity) {
                keep.insert(entity.id.to_string());
                // A full publish resends every config: after a broker restart it may have
                // lost its retained messages.
                self.published.remove(entity.id.as_str());
                self.publish_entity(entity).await?;
            }
        }
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|id| !keep.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.unpublish(&id).await?;
        }
        self.publish(self.topics.availability(), "online").await?;
        let mut filters = vec![
            self.topics.command_filter(),
            self.topics.config_filter(),
            format!("{}/status", self.topics.discovery),
        ];
        if let Some(importer) = &self.importer {
            filters.push(importer.filter());
        }
        for filter in filters {
            self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        }
        tracing::info!(exported = self.published.len(), "published to MQTT");
        Ok(())
    }

    async fn on_event(&mut self, event: Event) {
        let result = match event {
            Event::Entity(change) => {
                let entity = &change.entity;
                let id = entity.id.to_string();
                if change.deleted {
                    self.native.remove(&id);
                } else if !import::is_imported(&entity.attributes) {
                    self.native.insert(id.clone());
                }
                if !self.connected {
                    return;
                }
                if !change.deleted && self.exported(entity) {
                    self.publish_entity(entity).await
                } else if self.published.contains_key(&id) {
                    self.unpublish(&id).await
                } else {
                    Ok(())
                }
            }
            // A share granted or taken back changes which entities this home reads.
            Event::Share { .. } if self.connected => self.publish_all().await,
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "MQTT publish failed; retrying on reconnection");
        }
    }

    async fn on_message(&mut self, message: rumqttc::Publish) {
        let topic = message.topic.as_str();
        if let Some((id, field)) = self.topics.parse_command(topic) {
            let field = field.map(str::to_string);
            self.on_command(id, field.as_deref(), &message.payload)
                .await;
            return;
        }
        if let Some(id) = self.topics.parse_config(topic) {
            // A config left retained by an earlier run for an entity no longer exported
            // (deleted while the bridge was away): clear it.
            if !message.payload.is_empty() && !self.published.contains_key(&id) {
                tracing::info!(entity = %id, "clearing a stale MQTT discovery config");
                if let Err(error) = self.publish(topic.to_string(), Vec::new()).await {
                    tracing::warn!(%error, "MQTT publish failed");
                }
            }
            return;
        }
        if topic == format!("{}/status", self.topics.discovery) {
            // Home Assistant's birth message: it (re)started and wants the configs again
            // (they are retained, so a birth soon after a full publish needs nothing).
            let recent = self
                .last_full
                .is_some_and(|at| at.elapsed() < REPUBLISH_INTERVAL);
            if message.payload.as_ref() == b"online"
                && !recent
                && let Err(error) = self.publish_all().await
            {
                tracing::warn!(%error, "MQTT publish failed");
            }
            return;
        }
        let Some(importer) = &mut self.importer else {
            return;
        };
        if message.payload.len() > super::MAX_IMPORT_PAYLOAD {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                topic,
                bytes = message.payload.len(),
                max = super::MAX_IMPORT_PAYLOAD,
                "MQTT import message too large; ignored"
            );
            return;
        }
        let native = &self.native;
        match importer.on_message(topic, &message.payload, |id| native.contains(id)) {
            Ok(_) => {}
            Err(reason) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic, %reason, "MQTT import message refused");
            }
        }
        self.stats.imported.store(importer.len(), Ordering::Relaxed);
    }

    /// A command from Home Assistant: written through the node like any write, so a
    /// shared entity's write goes to its owner and a read-only share refuses it.
    async fn on_command(&mut self, id: String, field: Option<&str>, payload: &[u8]) {
        let reject = |reason: &str| {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(entity = %id, %reason, "MQTT command rejected");
        };
        if payload.len() > super::MAX_COMMAND_PAYLOAD {
            return reject("the payload is too large");
        }
        // Only entities the bridge exports take commands: the broker reaches no other.
        if !self.published.contains_key(&id) {
            return reject("the entity is not exported");
        }
        if !self.commands.take(tokio::time::Instant::now()) {
            return reject("commands arrive faster than 20 a second");
        }
        let command = match ha::parse_command(&id, field, payload) {
            Ok(command) => command,
            Err(reason) => return reject(&reason),
        };
        let write = match command {
            Command::State(state) => EntityWrite {
                state,
                attributes: None,
                correlation_id: Some("mqtt".into()),
            },
            Command::Attribute(name, value) => match self.entities.get(id.as_str()).await {
                Ok(Some(entity)) => {
                    let mut attributes = entity.attributes;
                    attributes.insert(name.into(), value);
                    EntityWrite {
                        state: entity.state,
                        attributes: Some(attributes),
                        correlation_id: Some("mqtt".into()),
                    }
                }
                Ok(None) => return reject("the entity is gone"),
                Err(error) => return reject(&error.to_string()),
            },
        };
        match self.entities.set(id.as_str(), write).await {
            Ok(_) => {
                self.stats.commands.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(entity = %id, "MQTT command written");
            }
            Err(Error::Forbidden(reason)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(entity = %id, %reason, "MQTT command refused: the entity is shared with this home read-only");
                // Home Assistant may show the command's state already; put the real one
                // back.
                if let Ok(Some(entity)) = self.entities.get(id.as_str()).await {
                    let _ = self
                        .publish(self.topics.state(&id), ha::state_payload(&entity))
                        .await;
                }
            }
            Err(error) => reject(&error.to_string()),
        }
    }

    /// Writes the imported entities gathered since the last flush, together.
    async fn flush_imports(&mut self) {
        let Some(importer) = &mut self.importer else {
            return;
        };
        let writes = importer.take_writes(IMPORT_WRITES_PER_FLUSH);
        for chunk in writes.chunks(crate::MAX_BATCH_WRITES) {
            if let Err(error) = self.entities.set_many(chunk.to_vec()).await {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "writing entities imported from MQTT failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_bucket_allows_a_burst_then_its_rate() {
        let start = tokio::time::Instant::now();
        let mut bucket = TokenBucket::new(20.0, 50.0);
        assert!((0..50).all(|_| bucket.take(start)));
        assert!(!bucket.take(start));
        // A tenth of a second later: two more.
        let later = start + Duration::from_millis(100);
        assert!(bucket.take(later));
        assert!(bucket.take(later));
        assert!(!bucket.take(later));
    }
}
