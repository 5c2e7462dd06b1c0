//! The activities service on the core: starting an activity (a document of the home) and
//! running it from its initiator, acknowledgements from the devices it names, the ack
//! timeout run by the core's loop, score increments from any device, and the events every
//! device raises from each change of an activity document, local or from a peer.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use hearth_crdt::schema::activity::{self as schema, ActivityPhase};
use hearth_crdt::{DocId, DocKind};
use hearth_storage::Batch;
use serde_json::{Map, Value, json};

use super::wire::ActivityMessage;
use super::{
    ACK_TIMEOUT, ACTIVITY_TYPES, Activity, ActivityAction, ActivityDevice, MAX_ACTIVITY_CONFIG,
    MAX_ACTIVITY_DEVICES, MAX_LIVE_ACTIVITIES, MAX_SCORE_DELTA, NewActivity,
};
use crate::Error;
use crate::core::effects::Effects;
use crate::core::{Core, Reply, doc_err, now_ms, rfc3339_ms};
use crate::events::Event;
use crate::propagation::limit::{RateLimit, Verdict};
use crate::trust::messages::ShareMessage;

/// Starts a device remembers having acknowledged, so a repeated start is answered again
/// without being announced twice.
const ACKED_KEPT: usize = 256;

/// Requests of the activities service.
pub(crate) enum ActivityRequest {
    Start {
        new: NewActivity,
        reply: Reply<Activity>,
    },
    Get {
        id: String,
        reply: Reply<Activity>,
    },
    List {
        reply: Reply<Vec<Activity>>,
    },
    Act {
        id: String,
        action: ActivityAction,
        reply: Reply<Activity>,
    },
    Score {
        id: String,
        device: String,
        delta: i64,
        reply: Reply<Activity>,
    },
}

impl ActivityRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        !matches!(self, Self::Get { .. } | Self::List { .. })
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::Start { reply, .. }
            | Self::Get { reply, .. }
            | Self::Act { reply, .. }
            | Self::Score { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::List { reply } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// What was last announced of an activity.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    phase: Option<ActivityPhase>,
    step: u64,
    acks: BTreeSet<String>,
    scores: BTreeMap<String, i64>,
}

/// The service's state.
#[derive(Default)]
pub(crate) struct ActivityState {
    /// Activities this device started that wait for acknowledgements, with their deadline.
    starting: BTreeMap<DocId, u64>,
    /// What was last announced of each activity document.
    seen: HashMap<DocId, Seen>,
    /// Starts this device acknowledged (activity ids), newest last.
    acked: VecDeque<String>,
    limit: RateLimit,
}

impl ActivityState {
    /// When the next start runs out of time, if one is waiting.
    pub(crate) fn deadline(&self) -> Option<u64> {
        self.starting.values().min().copied()
    }
}

/// The events one change of an activity announces, in order: `(name, extra data)`.
fn diff(before: &Seen, now: &schema::Activity) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    for device in now.acks.keys().filter(|d| !before.acks.contains(*d)) {
        out.push(("activity.acknowledged", json!({ "device_id": device })));
    }
    if before.phase.is_some() && now.step != before.step {
        out.push(("activity.step", json!({})));
    }
    let changed: BTreeMap<&String, i64> = now
        .scores
        .iter()
        .filter(|(d, s)| before.scores.get(*d).copied().unwrap_or(0) != **s)
        .map(|(d, s)| (d, *s))
        .collect();
    if !changed.is_empty() {
        out.push(("activity.score", json!({ "changed": changed })));
    }
    if before.phase != Some(now.phase) {
        let name = match now.phase {
            ActivityPhase::Pending => "activity.pending",
            ActivityPhase::Starting => "activity.starting",
            ActivityPhase::Active => "activity.active",
            ActivityPhase::Paused => "activity.paused",
            ActivityPhase::Ending => "activity.ending",
            ActivityPhase::Ended => "activity.ended",
        };
        out.push((name, json!({})));
        if now.phase == ActivityPhase::Ended {
            out.push(("coordination.group_end", json!({})));
        }
    }
    out
}

fn seen_of(a: &schema::Activity) -> Seen {
    Seen {
        phase: Some(a.phase),
        step: a.step,
        acks: a.acks.keys().cloned().collect(),
        scores: a.scores.clone(),
    }
}

fn activity_err(e: hearth_crdt::Error) -> Error {
    match e {
        hearth_crdt::Error::Schema { .. } => Error::Invalid(e.to_string()),
        hearth_crdt::Error::Refused { .. } => Error::Conflict(e.to_string()),
        other => doc_err(other),
    }
}

impl Core {
    /// Answers a request of the service.
    pub(crate) async fn handle_activities(&mut self, request: ActivityRequest) {
        match request {
            ActivityRequest::Start { new, reply } => {
                let result = self.step(|core, fx| core.start_activity(new, fx)).await;
                let _ = reply.send(result);
            }
            ActivityRequest::Get { id, reply } => {
                let _ = reply.send(self.activity_doc(&id).and_then(|d| self.activity_view(d)));
            }
            ActivityRequest::List { reply } => {
                let list = self
                    .activity_docs()
                    .into_iter()
                    .filter_map(|d| self.activity_view(d).ok())
                    .collect();
                let _ = reply.send(Ok(list));
            }
            ActivityRequest::Act { id, action, reply } => {
                let result = self.act_on_activity(&id, action);
                self.reply_after_flush(result, reply);
            }
            ActivityRequest::Score {
                id,
                device,
                delta,
                reply,
            } => {
                let result = self.add_activity_score(&id, &device, delta);
                self.reply_after_flush(result, reply);
            }
        }
    }

    /// Activity documents of this home whose content is here.
    fn activity_docs(&self) -> Vec<DocId> {
        self.engine
            .documents()
            .filter(|d| self.is_activity(*d))
            .collect()
    }

    fn is_activity(&self, doc: DocId) -> bool {
        self.engine
            .header(doc)
            .is_ok_and(|h| h.kind == DocKind::Activity && h.owner_home == self.home.home_id)
    }

    fn activity_doc(&self, id: &str) -> Result<DocId, Error> {
        DocId::parse(id)
            .filter(|d| self.is_activity(*d))
            .ok_or_else(|| Error::NotFound(format!("no activity {id:?} on this device")))
    }

    fn activity_view(&self, doc: DocId) -> Result<Activity, Error> {
        let a = self.engine.activity(doc).map_err(activity_err)?;
        let devices = a
            .devices
            .iter()
            .map(|d| ActivityDevice {
                device_id: d.as_str().into(),
                device: self.device_name_of(d),
                acknowledged_at: a.acks.get(d).copied().map(rfc3339_ms),
                score: a.scores.get(d).copied().unwrap_or(0),
            })
            .collect();
        // The document holds checked JSON text.
        let config = serde_json::from_str(&a.config).unwrap_or_default();
        Ok(Activity {
            id: doc.to_string(),
            kind: a.kind,
            state: a.phase.as_str().into(),
            reason: a.reason,
            initiator: a.initiator.into(),
            devices,
            config,
            room_id: a.room,
            step: a.step,
            scores: a.scores,
            missing: a.missing.into_iter().map(Into::into).collect(),
            final_scores: a.final_scores,
            created_at: rfc3339_ms(a.created_at_ms),
            started_at: a.started_at_ms.map(rfc3339_ms),
            ended_at: a.ended_at_ms.map(rfc3339_ms),
        })
    }

    /// Starts an activity run by this device: the document (pending, then starting), the
    /// start to every other device it names, and this device's own acknowledgement when
    /// it is one of them.
    fn start_activity(&mut self, new: NewActivity, fx: &mut Effects) -> Result<Activity, Error> {
        if !ACTIVITY_TYPES.contains(&new.kind.as_str()) {
            return Err(Error::Invalid(format!(
                "unknown activity type {:?}: use one of {}",
                new.kind.chars().take(32).collect::<String>(),
                ACTIVITY_TYPES.join(", ")
            )));
        }
        if new.device_ids.is_empty() || new.device_ids.len() > MAX_ACTIVITY_DEVICES {
            return Err(Error::Invalid(format!(
                "an activity names 1 to {MAX_ACTIVITY_DEVICES} devices, not {}",
                new.device_ids.len()
            )));
        }
        let config = serde_json::to_string(&new.config)
            .map_err(|e| Error::Invalid(format!("config does not encode: {e}")))?;
        if config.len() > MAX_ACTIVITY_CONFIG {
            return Err(Error::Invalid(format!(
                "config is {} bytes as JSON; at most {MAX_ACTIVITY_CONFIG} are allowed",
                config.len()
            )));
        }
        let mut devices: Vec<String> = Vec::with_capacity(new.device_ids.len());
        for named in &new.device_ids {
            let peer = self.resolve_home_device_named(named)?;
            if !devices.contains(&peer) {
                devices.push(peer);
            }
        }
        let room = match &new.room_id {
            Some(r) => Some(self.resolve_room(r)?.to_string()),
            None => None,
        };
        let live = self
            .activity_docs()
            .into_iter()
            .filter(|d| {
                self.engine
                    .activity(*d)
                    .is_ok_and(|a| a.phase != ActivityPhase::Ended)
            })
            .count();
        if live >= MAX_LIVE_ACTIVITIES {
            return Err(Error::Conflict(format!(
                "{live} activities of this home have not ended (at most {MAX_LIVE_ACTIVITIES}); \
                 end one first"
            )));
        }
        let doc = DocId::from_bytes(crate::home::random()?);
        let now = now_ms();
        let me = self.peer_id.clone();
        let spec = schema::NewActivity {
            kind: &new.kind,
            initiator: &me,
            devices: &devices,
            config: &config,
            room: room.as_deref(),
        };
        let (doc, mut batch) =
            self.create_shared_doc(doc, now, None, |engine, doc, epoch, home| {
                engine
                    .create_activity(doc, &home.home_id, epoch, &spec, now)
                    .map_err(activity_err)
            })?;
        let here = devices.contains(&me);
        let (_, out) = self
            .engine
            .write_activity(doc, now, |d| {
                let mut a = schema::transition(d, ActivityPhase::Starting, None, &[], now)?;
                // The initiator receives its own start at once.
                if here {
                    schema::acknowledge(d, &me, now)?;
                    a = schema::Activity::read(d)?;
                }
                if a.devices.iter().all(|x| a.acks.contains_key(x)) {
                    schema::transition(d, ActivityPhase::Active, None, &[], now)?;
                }
                Ok(())
            })
            .map_err(activity_err)?;
        crate::core::append(&mut batch, self.handle_outputs(out));
        fx.persist(batch);
        let view = self.activity_view(doc)?;
        let start = ActivityMessage::Start {
            activity: view.id.clone(),
            kind: view.kind.clone(),
            devices: devices.clone(),
            config,
        };
        for peer in devices.iter().filter(|p| **p != me) {
            self.send_activity_message(peer, &start);
        }
        self.send_queued(fx);
        fx.emit(self.group_start_event(&view, None));
        if view.state == ActivityPhase::Starting.as_str() {
            self.activities
                .starting
                .insert(doc, now + ACK_TIMEOUT.as_millis() as u64);
        }
        Ok(view)
    }

    /// Seed 000's `coordination.group_start`, as the seed shapes its payload.
    fn group_start_event(&self, view: &Activity, from_peer: Option<&str>) -> Event {
        Event::Coordination {
            name: "coordination.group_start",
            subject: view.id.clone(),
            data: json!({
                "activity_id": view.id,
                "activity_type": view.kind,
                "device_ids": view.devices.iter().map(|d| &d.device_id).collect::<Vec<_>>(),
                "initiator": view.initiator,
                "config": view.config,
            }),
            from_peer: from_peer.map(Into::into),
        }
    }

    fn send_activity_message(&mut self, peer: &str, message: &ActivityMessage) {
        if !self.peers.admitted.contains_key(peer) {
            return;
        }
        match message.encode() {
            Ok(bytes) => self.queue_share_message(
                peer,
                &ShareMessage::Activity {
                    bytes: serde_bytes::ByteBuf::from(bytes),
                },
            ),
            Err(error) => tracing::warn!(%error, "cannot encode an activity message"),
        }
    }

    /// Refuses a change of the activity's state on a device other than its initiator.
    fn check_initiator(&self, id: &str, a: &schema::Activity) -> Result<(), Error> {
        if a.initiator == self.peer_id {
            return Ok(());
        }
        let name = self
            .device_name_of(&a.initiator)
            .unwrap_or_else(|| a.initiator.clone());
        Err(Error::Conflict(format!(
            "activity {id} is run by {name}; pause, resume, step or end it there"
        )))
    }

    fn act_on_activity(
        &mut self,
        id: &str,
        action: ActivityAction,
    ) -> Result<(Activity, Batch), Error> {
        let doc = self.activity_doc(id)?;
        let a = self.engine.activity(doc).map_err(activity_err)?;
        self.check_initiator(id, &a)?;
        let now = now_ms();
        let mut batch = Batch::new();
        let mut write =
            |core: &mut Self, f: &dyn Fn(&mut automerge::AutoCommit) -> hearth_crdt::Result<()>| {
                let (_, out) = core
                    .engine
                    .write_activity(doc, now, |d| f(d))
                    .map_err(activity_err)?;
                crate::core::append(&mut batch, core.handle_outputs(out));
                Ok::<(), Error>(())
            };
        match action {
            ActivityAction::Pause => write(self, &|d| {
                schema::transition(d, ActivityPhase::Paused, None, &[], now).map(drop)
            })?,
            ActivityAction::Resume => write(self, &|d| {
                schema::transition(d, ActivityPhase::Active, None, &[], now).map(drop)
            })?,
            ActivityAction::Step => write(self, &|d| schema::advance(d).map(drop))?,
            ActivityAction::End => {
                // Two changes, so `ending` is a state every device can see pass.
                write(self, &|d| {
                    schema::transition(d, ActivityPhase::Ending, None, &[], now).map(drop)
                })?;
                write(self, &|d| {
                    schema::transition(d, ActivityPhase::Ended, Some("ended"), &[], now).map(drop)
                })?;
                self.activities.starting.remove(&doc);
            }
        }
        Ok((self.activity_view(doc)?, batch))
    }

    fn add_activity_score(
        &mut self,
        id: &str,
        device: &str,
        delta: i64,
    ) -> Result<(Activity, Batch), Error> {
        if delta == 0 || !(-MAX_SCORE_DELTA..=MAX_SCORE_DELTA).contains(&delta) {
            return Err(Error::Invalid(format!(
                "delta must be a non-zero whole number from -{MAX_SCORE_DELTA} to {MAX_SCORE_DELTA}"
            )));
        }
        let doc = self.activity_doc(id)?;
        let a = self.engine.activity(doc).map_err(activity_err)?;
        let peer = self.resolve_home_device_named(device)?;
        if !a.devices.contains(&peer) {
            return Err(Error::NotFound(format!(
                "{device} is not a device of activity {id}"
            )));
        }
        let (_, out) = self
            .engine
            .write_activity(doc, now_ms(), |d| schema::add_score(d, &peer, delta))
            .map_err(activity_err)?;
        let batch = self.handle_outputs(out);
        Ok((self.activity_view(doc)?, batch))
    }

    /// Starts past their time: the activity ends `no_ack`, naming who did not answer.
    pub(crate) async fn activity_tick(&mut self) {
        let now = now_ms();
        let late: Vec<DocId> = self
            .activities
            .starting
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(d, _)| *d)
            .collect();
        for doc in late {
            self.activities.starting.remove(&doc);
            let result = self
                .step(|core, fx| {
                    let (missing, out) = core
                        .engine
                        .write_activity(doc, now, |d| {
                            let a = schema::Activity::read(d)?;
                            let missing: Vec<String> = a
                                .devices
                                .iter()
                                .filter(|x| !a.acks.contains_key(*x))
                                .cloned()
                                .collect();
                            schema::transition(
                                d,
                                ActivityPhase::Ended,
                                Some("no_ack"),
                                &missing,
                                now,
                            )?;
                            Ok(missing)
                        })
                        .map_err(activity_err)?;
                    let batch = core.handle_outputs(out);
                    fx.persist(batch);
                    Ok(missing)
                })
                .await;
            match result {
                Ok(missing) => {
                    tracing::info!(%doc, ?missing, "activity ended: devices did not acknowledge its start")
                }
                Err(error) => {
                    tracing::warn!(%doc, %error, "could not end an activity that timed out")
                }
            }
        }
    }

    /// An activity message from an admitted device of this home: rate first, then shape,
    /// then whether the sender may send it. Dropped messages are logged.
    pub(crate) async fn on_activity_message(&mut self, peer: &str, bytes: &[u8]) {
        if let Verdict::Drop { log } = self.activities.limit.check(peer, now_ms()) {
            if log.is_some() {
                tracing::warn!(%peer, "a device sends activity messages faster than allowed");
            }
            return;
        }
        let (message, config) = match ActivityMessage::decode(bytes) {
            Ok(m) => m,
            Err(reason) => {
                tracing::warn!(%peer, %reason, len = bytes.len(), "activity message dropped");
                return;
            }
        };
        match message {
            ActivityMessage::Start {
                activity,
                kind,
                devices,
                ..
            } => {
                self.on_activity_start(peer, activity, kind, devices, config)
                    .await
            }
            ActivityMessage::Ack { activity } => self.on_activity_ack(peer, &activity).await,
        }
    }

    /// A start for this device: announced and acknowledged on receipt, if this device is
    /// named and the sender is the activity's initiator (as far as this device knows).
    async fn on_activity_start(
        &mut self,
        peer: &str,
        activity: String,
        kind: String,
        devices: Vec<String>,
        config: Map<String, Value>,
    ) {
        let doc = DocId::parse(&activity);
        let header = doc.and_then(|d| self.engine.header(d).ok().cloned());
        let refusal = if doc.is_none() {
            Some("not an activity id")
        } else if !devices.contains(&self.peer_id) {
            Some("a start that does not name this device")
        } else if header
            .as_ref()
            .is_some_and(|h| h.kind != DocKind::Activity || h.owner_home != self.home.home_id)
        {
            Some("not an activity of this home")
        } else if doc
            .and_then(|d| self.engine.activity(d).ok())
            .is_some_and(|a| a.initiator != peer)
        {
            Some("a start from a device that does not run the activity")
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::warn!(%peer, %activity, reason, "activity start dropped");
            return;
        }
        let first = !self.activities.acked.contains(&activity);
        let _ = self
            .step(|core, fx| {
                if first {
                    core.activities.acked.push_back(activity.clone());
                    if core.activities.acked.len() > ACKED_KEPT {
                        core.activities.acked.pop_front();
                    }
                    fx.emit(Event::Coordination {
                        name: "coordination.group_start",
                        subject: activity.clone(),
                        data: json!({
                            "activity_id": activity,
                            "activity_type": kind,
                            "device_ids": devices,
                            "initiator": peer,
                            "config": config,
                        }),
                        from_peer: Some(peer.into()),
                    });
                }
                core.send_activity_message(
                    peer,
                    &ActivityMessage::Ack {
                        activity: activity.clone(),
                    },
                );
                core.send_queued(fx);
                Ok(())
            })
            .await;
    }

    /// An acknowledgement of a start this device sent: counted only from a device the
    /// activity names, and only while it is starting.
    async fn on_activity_ack(&mut self, peer: &str, activity: &str) {
        let Some(doc) = DocId::parse(activity).filter(|d| self.activities.starting.contains_key(d))
        else {
            tracing::info!(%peer, %activity, "acknowledgement of no activity starting here; dropped");
            return;
        };
        let now = now_ms();
        let result = self
            .step(|core, fx| {
                let (active, out) = core
                    .engine
                    .write_activity(doc, now, |d| {
                        schema::acknowledge(d, peer, now)?;
                        let a = schema::Activity::read(d)?;
                        let all = a.devices.iter().all(|x| a.acks.contains_key(x));
                        if all && a.phase == ActivityPhase::Starting {
                            schema::transition(d, ActivityPhase::Active, None, &[], now)?;
                        }
                        Ok(all)
                    })
                    .map_err(activity_err)?;
                let batch = core.handle_outputs(out);
                fx.persist(batch);
                Ok(active)
            })
            .await;
        match result {
            Ok(true) => {
                self.activities.starting.remove(&doc);
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%peer, %activity, %error, "acknowledgement refused")
            }
        }
    }

    /// Announces what changed in an activity document (local or from a peer).
    pub(crate) fn on_activity_changed(&mut self, doc: DocId, from_peer: Option<String>) {
        if !self.is_activity(doc) {
            return;
        }
        let Ok(now) = self.engine.activity(doc) else {
            return;
        };
        let before = self.activities.seen.get(&doc).cloned().unwrap_or_default();
        let events = diff(&before, &now);
        self.activities.seen.insert(doc, seen_of(&now));
        if events.is_empty() {
            return;
        }
        let Ok(view) = self.activity_view(doc) else {
            return;
        };
        let base = serde_json::to_value(&view).unwrap_or(Value::Null);
        for (name, extra) in events {
            let mut data = base.clone();
            if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
                d.extend(e);
            }
            self.emit_event(Event::Coordination {
                name,
                subject: view.id.clone(),
                data,
                from_peer: from_peer.as_deref().map(Into::into),
            });
        }
    }

    /// At start: what each held activity says now (so only later changes are announced),
    /// and the starts this device made that were cut short by a stop (they end `no_ack`
    /// unless their acknowledgements come).
    pub(crate) fn remember_activities(&mut self) {
        let deadline = now_ms() + ACK_TIMEOUT.as_millis() as u64;
        for doc in self.activity_docs() {
            if let Ok(a) = self.engine.activity(doc) {
                if a.phase == ActivityPhase::Starting && a.initiator == self.peer_id {
                    self.activities.starting.insert(doc, deadline);
                }
                self.activities.seen.insert(doc, seen_of(&a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::TestCore;

    async fn call<T>(
        t: &TestCore,
        make: impl FnOnce(Reply<T>) -> ActivityRequest,
    ) -> Result<T, Error> {
        t.core.call(make).await.unwrap()
    }

    fn trivia(devices: &[&str]) -> NewActivity {
        NewActivity {
            kind: "trivia".into(),
            device_ids: devices.iter().map(|d| d.to_string()).collect(),
            config: json!({"rounds": 3}).as_object().cloned().unwrap(),
            room_id: None,
        }
    }

    /// Names of the coordination events received so far.
    fn names(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(e) = events.try_recv() {
            if let Event::Coordination { name, .. } = e {
                out.push(name);
            }
        }
        out
    }

    #[tokio::test]
    async fn an_activity_on_this_device_alone_runs_its_whole_life_with_events() {
        let t = TestCore::start("hall").await;
        let mut events = t.events();
        let new = trivia(&["hall"]);
        let a = call(&t, |reply| ActivityRequest::Start { new, reply })
            .await
            .unwrap();
        // Its only device is the initiator, which acknowledges on receipt.
        assert_eq!(a.state, "active");
        assert_eq!(a.devices[0].device.as_deref(), Some("hall"));
        assert!(a.devices[0].acknowledged_at.is_some());
        assert_eq!(a.config["rounds"], 3);
        let act = |action| {
            let id = a.id.clone();
            move |reply| ActivityRequest::Act { id, action, reply }
        };
        assert_eq!(call(&t, act(ActivityAction::Step)).await.unwrap().step, 1);
        let (id, device) = (a.id.clone(), "hall".to_string());
        let scored = call(&t, |reply| ActivityRequest::Score {
            id,
            device,
            delta: 4,
            reply,
        })
        .await
        .unwrap();
        assert_eq!(scored.scores[t.peer_id.as_str()], 4);
        assert_eq!(
            call(&t, act(ActivityAction::Pause)).await.unwrap().state,
            "paused"
        );
        assert!(matches!(
            call(&t, act(ActivityAction::Step)).await,
            Err(Error::Conflict(_))
        ));
        assert_eq!(
            call(&t, act(ActivityAction::Resume)).await.unwrap().state,
            "active"
        );
        let ended = call(&t, act(ActivityAction::End)).await.unwrap();
        assert_eq!(ended.state, "ended");
        assert_eq!(ended.reason.as_deref(), Some("ended"));
        assert_eq!(ended.final_scores.unwrap()[t.peer_id.as_str()], 4);
        assert_eq!(
            names(&mut events),
            [
                "activity.acknowledged",
                "activity.active",
                "coordination.group_start",
                "activity.step",
                "activity.score",
                "activity.paused",
                "activity.active",
                "activity.ending",
                "activity.ended",
                "coordination.group_end",
            ]
        );
        t.stop().await;
    }

    #[tokio::test]
    async fn bad_activities_and_scores_are_refused_and_change_nothing() {
        let t = TestCore::start("hall").await;
        let mut bad_type = trivia(&["hall"]);
        bad_type.kind = "poker".into();
        let mut big = trivia(&["hall"]);
        big.config
            .insert("x".into(), "y".repeat(MAX_ACTIVITY_CONFIG).into());
        let mut room = trivia(&["hall"]);
        room.room_id = Some("no-such-room".into());
        let many: Vec<String> = (0..=MAX_ACTIVITY_DEVICES)
            .map(|i| format!("d{i}"))
            .collect();
        let too_many = NewActivity {
            device_ids: many,
            ..trivia(&[])
        };
        for (new, invalid) in [
            (bad_type, true),
            (big, true),
            (trivia(&[]), true),
            (too_many, true),
            (trivia(&["attic"]), false),
            (room, false),
        ] {
            let got = call(&t, |reply| ActivityRequest::Start { new, reply }).await;
            match got {
                Err(Error::Invalid(_)) if invalid => {}
                Err(Error::NotFound(_)) if !invalid => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(
            call(&t, |reply| ActivityRequest::List { reply })
                .await
                .unwrap()
                .is_empty()
        );
        let new = trivia(&["hall"]);
        let a = call(&t, |reply| ActivityRequest::Start { new, reply })
            .await
            .unwrap();
        for (device, delta) in [("hall", 0), ("hall", MAX_SCORE_DELTA + 1), ("attic", 1)] {
            let (id, device) = (a.id.clone(), device.to_string());
            let got = call(&t, |reply| ActivityRequest::Score {
                id,
                device,
                delta,
                reply,
            })
            .await;
            assert!(
                matches!(got, Err(Error::Invalid(_) | Error::NotFound(_))),
                "{got:?}"
            );
        }
        t.stop().await;
    }

    #[tokio::test]
    async fn starts_and_acks_from_devices_not_named_are_dropped() {
        let t = TestCore::start("hall").await;
        let mut events = t.events();
        let me = t.peer_id.clone();
        let not_me = ActivityMessage::Start {
            activity: DocId::from_bytes([7; 16]).to_string(),
            kind: "story".into(),
            devices: vec!["12D3KooWother".into()],
            config: "{}".into(),
        }
        .encode()
        .unwrap();
        let for_me = ActivityMessage::Start {
            activity: DocId::from_bytes([8; 16]).to_string(),
            kind: "story".into(),
            devices: vec![me],
            config: "{}".into(),
        }
        .encode()
        .unwrap();
        let stray_ack = ActivityMessage::Ack {
            activity: DocId::from_bytes([9; 16]).to_string(),
        }
        .encode()
        .unwrap();
        t.on_core(move |core| {
            Box::pin(async move {
                core.on_activity_message("12D3KooWpeer", b"\xa1\x00").await;
                core.on_activity_message("12D3KooWpeer", &not_me).await;
                core.on_activity_message("12D3KooWpeer", &stray_ack).await;
                // Named: announced once, even when the start comes twice.
                core.on_activity_message("12D3KooWpeer", &for_me).await;
                core.on_activity_message("12D3KooWpeer", &for_me).await;
            })
        })
        .await;
        assert_eq!(names(&mut events), ["coordination.group_start"]);
        t.stop().await;
    }

    #[test]
    fn a_change_is_announced_once_for_what_it_changed() {
        let mut a = schema::Activity {
            kind: "trivia".into(),
            initiator: "a".into(),
            devices: vec!["a".into(), "b".into()],
            config: "{}".into(),
            room: None,
            phase: ActivityPhase::Starting,
            reason: None,
            step: 0,
            created_at_ms: 1,
            started_at_ms: None,
            ended_at_ms: None,
            acks: BTreeMap::new(),
            scores: [("a".to_string(), 0), ("b".to_string(), 0)].into(),
            missing: vec![],
            final_scores: None,
        };
        let first = diff(&Seen::default(), &a);
        assert_eq!(
            first.iter().map(|e| e.0).collect::<Vec<_>>(),
            ["activity.starting"]
        );
        let seen = seen_of(&a);
        assert!(diff(&seen, &a).is_empty(), "nothing changed, nothing said");
        a.acks.insert("b".into(), 5);
        a.scores.insert("b".into(), 7);
        a.step = 2;
        a.phase = ActivityPhase::Ended;
        let names: Vec<_> = diff(&seen, &a).iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "activity.acknowledged",
                "activity.step",
                "activity.score",
                "activity.ended",
                "coordination.group_end"
            ]
        );
        assert_eq!(diff(&seen, &a)[2].1["changed"]["b"], 7);
    }
}
