//! Turns the node's event stream ([`crate::Node::events`]: entity changes and deletions,
//! rooms, chat, presence, peers coming and going) into bus events. Runs as its own task,
//! so handlers on the bus never hold up the core.

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{Bus, Event, Source};
use crate::core::CoreHandle;
use crate::events::{Event as CoreEvent, EventItem, Events};

/// Who this node is, for the `source` of the events it publishes.
pub(crate) struct Identity {
    pub(crate) home_id: String,
    pub(crate) peer_id: String,
}

/// Spawns the task that publishes `events` into `bus` until `cancel` fires or the core
/// stops. `events` should be subscribed before the core started
/// ([`crate::core::NodeFacts::events_from_start`]), so that nothing the core announced at
/// start (a static peer admitted at once) is missed.
pub(crate) fn spawn(
    core: &CoreHandle,
    events: broadcast::Receiver<CoreEvent>,
    bus: Bus,
    me: Identity,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut events = Events {
        rx: events,
        core: core.clone(),
    };
    let bridge = Bridge { bus, me };
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            loop {
                let item = tokio::select! {
                    _ = cancel.cancelled() => break,
                    item = events.next() => item,
                };
                match item {
                    Some(EventItem::Event(event)) => bridge.core_event(event),
                    Some(EventItem::Missed(n)) => {
                        tracing::warn!(missed = n, "event bus fell behind the core; events lost");
                        bridge.missed(n);
                    }
                    None => break,
                }
            }
        },
        tracing::error_span!("bus"),
    ))
}

struct Bridge {
    bus: Bus,
    me: Identity,
}

fn to_json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or_else(|_| json!({}))
}

impl Bridge {
    fn source(&self, device: String) -> Source {
        Source {
            home: self.me.home_id.clone(),
            device,
        }
    }

    /// The device behind a change: the peer it came from, or this node.
    fn sender(&self, from_peer: Option<&str>) -> String {
        from_peer.unwrap_or(&self.me.peer_id).to_string()
    }

    fn core_event(&self, event: CoreEvent) {
        let name = event.name();
        let subject = event.subject().to_string();
        let from_peer = event.from_peer().map(|p| p.to_string());
        let (data, device, correlation_id) = match &event {
            CoreEvent::Entity(change) => {
                // A write names its writer (by PeerId; by actor id in hex only for a
                // device this node does not know). A deletion's last state does not.
                let device = if change.deleted {
                    self.sender(from_peer.as_deref())
                } else {
                    change.entity.updated_by.to_string()
                };
                // The API caps correlation ids; one from elsewhere that is too long is
                // dropped rather than losing the whole event.
                let correlation = change
                    .correlation_id
                    .clone()
                    .filter(|c| c.len() <= super::MAX_CORRELATION_ID_LEN);
                (to_json(&change.entity), device, correlation)
            }
            CoreEvent::RoomCreated { room, .. } => {
                (to_json(room), self.sender(from_peer.as_deref()), None)
            }
            CoreEvent::MemberJoined { room_id, user, .. }
            | CoreEvent::MemberLeft { room_id, user, .. } => (
                json!({ "room_id": room_id, "user": user }),
                self.sender(from_peer.as_deref()),
                None,
            ),
            CoreEvent::Chat { message, .. } => {
                (to_json(message), self.sender(from_peer.as_deref()), None)
            }
            CoreEvent::Presence { presence, .. } => {
                (to_json(presence), presence.device.to_string(), None)
            }
            CoreEvent::Conflict {
                entity_id,
                field,
                policy,
                candidates,
                chosen,
                ..
            } => (
                json!({ "entity_id": entity_id, "field": field, "policy": policy,
                        "candidates": candidates, "chosen": chosen }),
                self.sender(None),
                None,
            ),
            CoreEvent::Share {
                entity_id,
                owner,
                home,
                rights,
                ..
            } => (
                json!({ "entity_id": entity_id, "owner": owner, "home": home, "rights": rights }),
                self.sender(from_peer.as_deref()),
                None,
            ),
            CoreEvent::PeerConnected { peer, device_name }
            | CoreEvent::PeerDisconnected { peer, device_name } => {
                return self.peer(name, peer, device_name);
            }
            CoreEvent::Device { event, from_peer } => {
                return self.device_event(event, from_peer.as_deref());
            }
            CoreEvent::Alert { alert, .. } => {
                return self.alert_event(alert, from_peer.as_deref());
            }
            CoreEvent::Lock { action, lock } => (
                json!({ "action": action, "lock": lock }),
                self.sender(None),
                None,
            ),
            CoreEvent::UserState {
                user,
                state,
                source_device,
                ..
            } => (
                json!({ "user": user, "state": state, "source_device": source_device }),
                self.sender(from_peer.as_deref()),
                None,
            ),
            CoreEvent::Coordination { data, .. } => {
                (data.clone(), self.sender(from_peer.as_deref()), None)
            }
            CoreEvent::Notification { notification, .. } => (
                json!({ "notification": notification, "channel": "sockets" }),
                self.sender(from_peer.as_deref()),
                None,
            ),
            CoreEvent::NotificationPush {
                notification,
                outcome,
            } => (
                json!({ "notification": notification, "channel": outcome.target,
                        "url": outcome.url, "attempts": outcome.attempts,
                        "error": outcome.error }),
                self.sender(None),
                None,
            ),
        };
        let mut out = Event::new(name, subject, data, self.source(device))
            .with_correlation_id(correlation_id)
            .with_metadata(
                "origin",
                json!(if from_peer.is_some() {
                    "remote"
                } else {
                    "local"
                }),
            );
        if let Some(peer) = from_peer {
            out = out.with_metadata("from_peer", json!(peer));
        }
        self.publish_with_alias(out);
    }

    /// A device coming or going: this node's own observation, so without the origin
    /// metadata of changes.
    fn peer(&self, name: &str, peer: &str, device_name: &Option<String>) {
        let data = json!({ "peer_id": peer, "device_name": device_name });
        let event = Event::new(name, peer, data, self.source(peer.to_string()));
        self.publish_with_alias(event);
    }

    /// An event a device published (see `crate::propagation`): named by its type, about
    /// its source device, its payload as data, its source's time, its correlation id
    /// kept, and its targets in the metadata (`target_device_ids`), which marks it as a
    /// device event for the WebSocket.
    fn device_event(&self, event: &crate::propagation::DeviceEvent, from_peer: Option<&str>) {
        let mut out = Event::new(
            event.event_type.as_str(),
            event.source_device_id.as_str(),
            Value::Object(event.payload.clone()),
            self.source(event.source_device_id.to_string()),
        )
        .with_correlation_id(event.correlation_id.clone())
        .with_metadata(
            "origin",
            json!(if from_peer.is_some() {
                "remote"
            } else {
                "local"
            }),
        )
        .with_metadata("target_device_ids", json!(event.target_device_ids));
        out.time = event.timestamp.unix_ms() as f64 / 1000.0;
        if let Some(peer) = from_peer {
            out = out.with_metadata("from_peer", json!(peer));
        }
        self.publish(out);
    }

    /// An emergency alert: about the alert (its id), the alert as data, its source's
    /// home and device (a paired home's for one from there), and its send time.
    fn alert_event(&self, alert: &crate::alerts::Alert, from_peer: Option<&str>) {
        let source = Source {
            home: alert.source.home.to_string(),
            device: alert.source.device.to_string(),
        };
        let mut out = Event::new("emergency.alert", alert.id.as_str(), to_json(alert), source)
            .with_metadata(
                "origin",
                json!(if from_peer.is_some() {
                    "remote"
                } else {
                    "local"
                }),
            );
        out.time = alert.sent_at.unix_ms() as f64 / 1000.0;
        if let Some(peer) = from_peer {
            out = out.with_metadata("from_peer", json!(peer));
        }
        self.publish(out);
    }

    /// Publishes `event`, then under seed 000's name where it has one
    /// ([`super::alias_of`]), with `metadata.alias_of` naming the original.
    fn publish_with_alias(&self, event: Event) {
        let alias = super::alias_of(&event.name).map(|alias| {
            let mut copy = event.clone().with_metadata("alias_of", json!(event.name));
            copy.name = alias.to_string();
            copy
        });
        self.publish(event);
        if let Some(alias) = alias {
            self.publish(alias);
        }
    }

    /// Tells the bus's readers that `count` events were lost here, at this point of the
    /// stream, so a client holding state built from events knows to read it afresh.
    fn missed(&self, count: u64) {
        let event = Event::new(
            super::MISSED_EVENT,
            "",
            json!({ "count": count }),
            self.source(self.me.peer_id.clone()),
        );
        self.publish(event);
    }

    fn publish(&self, event: Event) {
        if let Err(error) = self.bus.publish(event) {
            tracing::warn!(%error, "could not publish a node event");
        }
    }
}
