//! Turns what the node's core reports (entity changes, peers coming and going) into bus
//! events. Runs as its own task, so handlers on the bus never hold up the core.

use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{Bus, Event, Source};
use crate::core::{CoreHandle, Notice};
use crate::entities::EntityChange;

/// Who this node is, for the `source` of the events it publishes.
pub(crate) struct Identity {
    pub(crate) home_id: String,
}

/// Subscribes to the core at once (so nothing after start is missed) and spawns the task
/// that publishes into `bus` until `cancel` fires or the core stops.
pub(crate) fn spawn(
    core: &CoreHandle,
    bus: Bus,
    me: Identity,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut changes = core.events.subscribe();
    let mut notices = core.notices.subscribe();
    let bridge = Bridge { bus, me };
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    change = changes.recv() => match change {
                        Ok(change) => bridge.entity_changed(change),
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "event bus fell behind the core; entity events lost");
                        }
                        Err(RecvError::Closed) => break,
                    },
                    notice = notices.recv() => match notice {
                        Ok(notice) => bridge.notice(notice),
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "event bus fell behind the core; peer events lost");
                        }
                        Err(RecvError::Closed) => break,
                    },
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

impl Bridge {
    fn source(&self, device: String) -> Source {
        Source {
            home: self.me.home_id.clone(),
            device,
        }
    }

    fn entity_changed(&self, change: EntityChange) {
        // The core names the writer by PeerId (its actor id in hex only for a device it
        // does not know).
        let device = change.entity.updated_by.clone();
        let subject = change.entity.id.clone();
        let data = serde_json::to_value(&change.entity).unwrap_or_else(|_| json!({}));
        let mut event = Event::new("entity.changed", subject, data, self.source(device))
            // The API caps correlation ids; one from elsewhere that is too long is dropped
            // rather than losing the whole event.
            .with_correlation_id(
                change
                    .correlation_id
                    .filter(|c| c.len() <= super::MAX_CORRELATION_ID_LEN),
            )
            .with_metadata(
                "origin",
                json!(if change.from_peer.is_some() {
                    "remote"
                } else {
                    "local"
                }),
            );
        if let Some(peer) = change.from_peer {
            event = event.with_metadata("from_peer", json!(peer));
        }
        self.publish(event);
    }

    fn notice(&self, notice: Notice) {
        let (name, peer, device_name) = match notice {
            Notice::PeerConnected { peer, device_name } => ("peer.connected", peer, device_name),
            Notice::PeerDisconnected { peer, device_name } => {
                ("peer.disconnected", peer, device_name)
            }
        };
        let data = json!({ "peer_id": peer, "device_name": device_name });
        let event = Event::new(name, peer.clone(), data, self.source(peer));
        self.publish(event);
    }

    fn publish(&self, event: Event) {
        if let Err(error) = self.bus.publish(event) {
            tracing::warn!(%error, "could not publish a node event");
        }
    }
}
