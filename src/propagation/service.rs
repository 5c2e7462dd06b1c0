//! The events-across-devices service on the core: publishing decides synchronously who
//! gets the event and records the effects (frames to the targets, the local event); a
//! received event is rate-limited, decoded, checked and delivered here.

use super::limit::{RateLimit, Verdict};
use super::wire::EventMessage;
use super::{DeviceEvent, PropagationCounters, Publish, PublishReport};
use crate::Error;
use crate::core::effects::Effects;
use crate::core::{Core, Reply, doc_err, now_ms};
use crate::events::Event;
use crate::trust::messages::ShareMessage;
use crate::types::{DeviceId, Timestamp};

/// Requests of the events-across-devices service.
pub(crate) enum PropagationRequest {
    Publish {
        event: Publish,
        reply: Reply<PublishReport>,
    },
    Counters {
        reply: Reply<PropagationCounters>,
    },
}

impl PropagationRequest {
    /// Events are never stored, so nothing here is refused while the store is failed.
    pub(crate) fn is_write(&self) -> bool {
        false
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::Publish { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Counters { reply } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The service's state: the senders' rate limits and the counters.
#[derive(Default)]
pub(crate) struct PropagationState {
    pub(crate) limit: RateLimit,
    pub(crate) counters: PropagationCounters,
}

/// Why a received event was dropped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Over the sender's rate; `log` as [`Verdict::Drop`] says.
    Rate { log: Option<u64> },
    /// Malformed, oversized, reserved, or not for this device.
    Refused(String),
}

/// Takes in an event that admitted device `peer` sent this device (`me`): its rate first
/// (before any decoding), then its shape, then whether this device is a target.
pub(crate) fn receive(
    state: &mut PropagationState,
    me: &str,
    peer: &str,
    bytes: &[u8],
    now_ms: u64,
) -> Result<DeviceEvent, Dropped> {
    if let Verdict::Drop { log } = state.limit.check(peer, now_ms) {
        state.counters.dropped_rate += 1;
        return Err(Dropped::Rate { log });
    }
    let accepted = EventMessage::decode(bytes).and_then(|(message, payload)| {
        if !message.targets.is_empty() && !message.targets.iter().any(|t| t == me) {
            return Err("an event for other devices".to_string());
        }
        Ok(DeviceEvent {
            event_type: message.event_type,
            source_device_id: peer.into(),
            target_device_ids: message.targets.into_iter().map(DeviceId::from).collect(),
            payload,
            timestamp: Timestamp::from_unix_ms(message.timestamp_ms),
            correlation_id: message.correlation_id,
        })
    });
    match accepted {
        Ok(event) => {
            state.counters.received += 1;
            Ok(event)
        }
        Err(reason) => {
            state.counters.dropped_malformed += 1;
            Err(Dropped::Refused(reason))
        }
    }
}

impl Core {
    /// Answers a request of the service.
    pub(crate) async fn handle_propagation(&mut self, request: PropagationRequest) {
        match request {
            PropagationRequest::Publish { event, reply } => {
                let result = self
                    .step(|core, fx| core.publish_device_event(event, fx))
                    .await;
                let _ = reply.send(result);
            }
            PropagationRequest::Counters { reply } => {
                let _ = reply.send(Ok(self.propagation.counters));
            }
        }
    }

    /// Decides who gets `publish` and records it: a frame to each target that is
    /// connected (every connected device of the home for a broadcast), and the event here
    /// when this device is a target. Nothing goes to a device that is not a target.
    fn publish_device_event(
        &mut self,
        publish: Publish,
        fx: &mut Effects,
    ) -> Result<PublishReport, Error> {
        super::check_type(&publish.event_type)?;
        let payload_json = super::check_payload(&publish.payload)?;
        super::check_correlation_id(publish.correlation_id.as_deref())?;
        if publish.target_device_ids.len() > super::MAX_EVENT_TARGETS {
            return Err(Error::Invalid(format!(
                "{} targets; at most {} are allowed",
                publish.target_device_ids.len(),
                super::MAX_EVENT_TARGETS
            )));
        }
        let targets = self.resolve_event_targets(&publish.target_device_ids)?;
        let event = DeviceEvent {
            event_type: publish.event_type,
            source_device_id: self.peer_id.as_str().into(),
            target_device_ids: targets.iter().map(DeviceId::from).collect(),
            payload: publish.payload,
            timestamp: Timestamp::from_unix_ms(now_ms()),
            correlation_id: publish.correlation_id,
        };
        let message = EventMessage {
            event_type: event.event_type.clone(),
            targets: targets.clone(),
            payload: payload_json,
            timestamp_ms: event.timestamp.unix_ms(),
            correlation_id: event.correlation_id.clone(),
        };
        let bytes = serde_bytes::ByteBuf::from(message.encode()?);
        let (recipients, delivered_here): (Vec<String>, bool) = if targets.is_empty() {
            (self.peers.admitted.keys().cloned().collect(), true)
        } else {
            let others = targets
                .iter()
                .filter(|t| **t != self.peer_id)
                .cloned()
                .collect();
            (others, targets.contains(&self.peer_id))
        };
        let mut sent_to = Vec::new();
        let mut not_connected = Vec::new();
        for peer in recipients {
            if self.peers.admitted.contains_key(&peer) {
                self.queue_share_message(
                    &peer,
                    &ShareMessage::Event {
                        bytes: bytes.clone(),
                    },
                );
                sent_to.push(DeviceId::from(peer));
            } else {
                not_connected.push(DeviceId::from(peer));
            }
        }
        self.send_queued(fx);
        self.propagation.counters.published += 1;
        self.propagation.counters.sent += sent_to.len() as u64;
        if delivered_here {
            fx.emit(Event::Device {
                event: Box::new(event.clone()),
                from_peer: None,
            });
        }
        Ok(PublishReport {
            event,
            delivered_here,
            sent_to,
            not_connected,
        })
    }

    /// PeerIds of the named devices of this home (each a PeerId or a device name), in the
    /// order given, without repeats. A revoked device is no device of the home.
    pub(crate) fn resolve_event_targets(&self, named: &[String]) -> Result<Vec<String>, Error> {
        if named.is_empty() {
            return Ok(Vec::new());
        }
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .map_err(doc_err)?;
        let mut out: Vec<String> = Vec::with_capacity(named.len());
        for name in named {
            let matches: Vec<&String> = devices
                .iter()
                .filter(|(peer, record)| {
                    record.revoked_at.is_none()
                        && !self.revocations.contains(peer.as_str())
                        && (*peer == name || record.name == *name)
                })
                .map(|(peer, _)| peer)
                .collect();
            let peer = match matches.as_slice() {
                [one] => (*one).clone(),
                [] => {
                    return Err(Error::NotFound(format!(
                        "no device {name:?} in this home; name a device by its PeerId or \
                         its name (see `hearth status`)"
                    )));
                }
                _ => {
                    return Err(Error::Conflict(format!(
                        "more than one device is named {name:?}; use its PeerId"
                    )));
                }
            };
            if !out.contains(&peer) {
                out.push(peer);
            }
        }
        Ok(out)
    }

    /// An event from an admitted device of this home. Dropped events are logged (those
    /// over the rate at most once in a while per sender) and counted.
    pub(crate) fn on_event_message(&mut self, peer: &str, bytes: &[u8]) {
        let me = self.peer_id.clone();
        match receive(&mut self.propagation, &me, peer, bytes, now_ms()) {
            Ok(event) => self.emit_event(Event::Device {
                event: Box::new(event),
                from_peer: Some(peer.into()),
            }),
            Err(Dropped::Rate { log: Some(dropped) }) => tracing::warn!(
                %peer,
                dropped,
                per_second = super::limit::EVENTS_PER_SECOND,
                "a device sends events faster than allowed; dropping them"
            ),
            Err(Dropped::Rate { log: None }) => {}
            Err(Dropped::Refused(reason)) => {
                tracing::warn!(%peer, %reason, len = bytes.len(), "event from a device dropped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::TestCore;
    use crate::propagation::limit::EVENT_BURST;
    use serde_json::Map;

    fn message(targets: &[&str]) -> Vec<u8> {
        EventMessage {
            event_type: "coordination.broadcast".into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            payload: r#"{"n":1}"#.into(),
            timestamp_ms: 1_000,
            correlation_id: Some("req-7".into()),
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn a_broadcast_or_an_event_for_this_device_is_taken_with_its_source_and_correlation() {
        let mut state = PropagationState::default();
        let got = receive(&mut state, "me", "sender", &message(&[]), 5).unwrap();
        assert_eq!(got.source_device_id, "sender");
        assert_eq!(got.correlation_id.as_deref(), Some("req-7"));
        assert_eq!(got.payload["n"], 1);
        let got = receive(&mut state, "me", "sender", &message(&["other", "me"]), 5).unwrap();
        assert_eq!(got.target_device_ids, ["other", "me"]);
        assert_eq!(state.counters.received, 2);
    }

    #[test]
    fn an_event_for_other_devices_or_a_malformed_one_is_dropped() {
        let mut state = PropagationState::default();
        assert!(matches!(
            receive(&mut state, "me", "sender", &message(&["other"]), 5),
            Err(Dropped::Refused(_))
        ));
        assert!(matches!(
            receive(&mut state, "me", "sender", b"\x00garbage", 5),
            Err(Dropped::Refused(_))
        ));
        assert_eq!(state.counters.dropped_malformed, 2);
        assert_eq!(state.counters.received, 0);
    }

    #[test]
    fn a_flooding_sender_is_cut_to_its_rate_before_decoding() {
        let mut state = PropagationState::default();
        let bytes = message(&[]);
        let taken = (0..EVENT_BURST + 40)
            .filter(|_| receive(&mut state, "me", "flood", &bytes, 5).is_ok())
            .count() as u64;
        assert_eq!(taken, EVENT_BURST);
        assert_eq!(state.counters.dropped_rate, 40);
        // Garbage over the rate is dropped for the rate, without being read.
        assert!(matches!(
            receive(&mut state, "me", "flood", b"\xff", 5),
            Err(Dropped::Rate { .. })
        ));
        // Another device is not held back by it.
        assert!(receive(&mut state, "me", "calm", &bytes, 5).is_ok());
    }

    async fn publish(t: &TestCore, event: Publish) -> Result<PublishReport, Error> {
        t.core
            .call(|reply| PropagationRequest::Publish { event, reply })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn publishing_delivers_here_with_the_seed_fields_and_names_absent_targets() {
        let t = TestCore::start("hall").await;
        let mut events = t.events();
        let mut payload = Map::new();
        payload.insert("song".into(), "lullaby".into());
        let report = publish(
            &t,
            Publish::new("coordination.broadcast")
                .payload(payload)
                .correlation_id("req-1"),
        )
        .await
        .unwrap();
        assert!(report.delivered_here);
        assert!(report.sent_to.is_empty() && report.not_connected.is_empty());
        assert_eq!(report.event.source_device_id, t.peer_id.as_str());
        let Event::Device { event, from_peer } = events.recv().await.unwrap() else {
            panic!("not a device event");
        };
        assert_eq!(from_peer, None);
        assert_eq!(event.event_type, "coordination.broadcast");
        assert_eq!(event.payload["song"], "lullaby");
        assert_eq!(event.correlation_id.as_deref(), Some("req-1"));

        // Targeted at this device by name: delivered here, and the target is its PeerId.
        let report = publish(&t, Publish::new("session.handoff").to(["hall"]))
            .await
            .unwrap();
        assert!(report.delivered_here);
        assert_eq!(report.event.target_device_ids, [t.peer_id.as_str()]);
        assert!(matches!(events.recv().await.unwrap(), Event::Device { .. }));
        let counters = t
            .core
            .call(|reply| PropagationRequest::Counters { reply })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(counters.published, 2);
        t.stop().await;
    }

    #[tokio::test]
    async fn bad_events_and_unknown_targets_are_refused_and_nothing_is_delivered() {
        let t = TestCore::start("hall").await;
        let mut events = t.events();
        let cases = [
            Publish::new("entity.changed"),
            Publish::new("nodots"),
            Publish::new("a.b").correlation_id("c".repeat(200)),
            Publish::new("a.b").to(vec!["x".to_string(); super::super::MAX_EVENT_TARGETS + 1]),
        ];
        for case in cases {
            let name = case.event_type.clone();
            assert!(
                matches!(publish(&t, case).await, Err(Error::Invalid(_))),
                "{name} accepted"
            );
        }
        let mut big = Map::new();
        big.insert(
            "x".into(),
            "y".repeat(super::super::MAX_EVENT_PAYLOAD).into(),
        );
        assert!(matches!(
            publish(&t, Publish::new("a.b").payload(big)).await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            publish(&t, Publish::new("a.b").to(["kitchen"])).await,
            Err(Error::NotFound(_))
        ));
        assert!(events.try_recv().is_err(), "a refused event was delivered");
        t.stop().await;
    }
}
