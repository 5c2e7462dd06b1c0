//! The playback service on the core: clock probes to every admitted device of the home
//! (one with each heartbeat, a few at once after an admission), answers to theirs, and
//! playbacks: started here (scheduled here, sent to the other targets, which report their
//! local start back) or received (scheduled by this device's estimate of the initiator's
//! clock, then reported). Clock-lane messages from each peer go through a token bucket
//! (the events' rates) before they are decoded. Nothing here is stored.
//!
//! Playbacks are kept by initiator and id, so a device that learned another's playback id
//! cannot take that playback over by sending it first. Each device may have at most
//! [`MAX_RECEIVED_PER_DEVICE`] of its playbacks kept here (its oldest go), received ones
//! at most [`MAX_PLAYBACKS`] in all, and playbacks started here are never evicted for
//! received ones. A received playback whose local start is more than [`RESEND_FOR_MS`]
//! past is dropped rather than announced, and one still waiting for a clock estimate
//! after [`PENDING_FOR_MS`] is forgotten (the initiator sends it again until its start).

use std::collections::BTreeMap;

use hearth_net::PeerId;

use super::clock::{ClockBook, ClockEstimate, Taken};
use super::wire::ClockMessage;
use super::{
    DeviceSchedule, MAX_PLAYBACK_DEVICES, MAX_PLAYBACKS, NewPlayback, PlaybackDevice,
    PlaybackSchedule,
};
use crate::Error;
use crate::core::{Core, Reply, doc_err, now_ms};
use crate::events::Event;
use crate::propagation::limit::{RateLimit, Verdict};
use crate::types::{DeviceId, Timestamp};

/// The name of the event each device raises with its local start.
pub(crate) const SYNC_PLAYBACK: &str = "coordination.sync_playback";
/// The name of the event the initiator raises as each device reports its local start.
pub(crate) const SYNC_PLAYBACK_SCHEDULED: &str = "coordination.sync_playback_scheduled";
/// How long after its start the initiator keeps sending a playback to targets that have
/// not reported (ms): a device that connects late still gets it.
const RESEND_FOR_MS: u64 = 10_000;
/// Received playbacks kept per initiating device; its oldest go first.
pub(crate) const MAX_RECEIVED_PER_DEVICE: usize = 8;
/// How long a received playback may wait for a clock estimate of its initiator (ms).
const PENDING_FOR_MS: u64 = 60_000;

/// A kept playback's key: its initiator (PeerId) and its id.
type Key = (String, String);

/// Requests of the playback service.
pub(crate) enum PlaybackRequest {
    Start {
        playback: NewPlayback,
        reply: Reply<PlaybackSchedule>,
    },
    Get {
        id: String,
        reply: Reply<PlaybackSchedule>,
    },
    List {
        reply: Reply<Vec<PlaybackSchedule>>,
    },
    Clocks {
        reply: Reply<Vec<(DeviceId, ClockEstimate)>>,
    },
    /// Test hook: moves this device's playback clock by `ms`, as a device whose clock is
    /// set wrong, and forgets every sample taken so far.
    #[cfg(feature = "test-hooks")]
    Skew {
        ms: i64,
        reply: Reply<()>,
    },
}

impl PlaybackRequest {
    /// Nothing here is stored, so nothing is refused while the store is failed.
    pub(crate) fn is_write(&self) -> bool {
        false
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::Start { reply, .. } | Self::Get { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::List { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Clocks { reply } => {
                let _ = reply.send(Err(error));
            }
            #[cfg(feature = "test-hooks")]
            Self::Skew { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The service's state.
pub(crate) struct PlaybackState {
    pub(crate) clock: ClockBook,
    /// Playbacks by initiator and id, each with the order it came in.
    playbacks: BTreeMap<Key, (u64, PlaybackSchedule)>,
    seq: u64,
    limit: RateLimit,
    /// Added to the system clock (µs); only the test hook sets it.
    skew_us: i64,
    /// Messages dropped: malformed, over the rate, from a paired home, or impossible.
    pub(crate) dropped: u64,
    /// The origin of [`Self::mono_us`].
    epoch: std::time::Instant,
}

impl Default for PlaybackState {
    fn default() -> Self {
        Self {
            clock: ClockBook::default(),
            playbacks: BTreeMap::new(),
            seq: 0,
            limit: RateLimit::default(),
            skew_us: 0,
            dropped: 0,
            epoch: std::time::Instant::now(),
        }
    }
}

impl PlaybackState {
    /// This device's clock for playback, in µs since the Unix epoch.
    pub(crate) fn now_us(&self) -> i64 {
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        us.saturating_add(self.skew_us)
    }

    /// A monotonic clock, in µs since this state was made: round trips are measured by it,
    /// so a step of the system clock cannot shorten one.
    pub(crate) fn mono_us(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.now_us().max(0) / 1000).unwrap_or(0)
    }

    /// Keeps `schedule`. Past the caps the oldest of its kind goes: started here, at most
    /// [`MAX_PLAYBACKS`]; received, at most [`MAX_RECEIVED_PER_DEVICE`] of its initiator
    /// and [`MAX_PLAYBACKS`] in all. A received playback never evicts one started here.
    fn keep(&mut self, schedule: PlaybackSchedule) {
        self.seq += 1;
        let here = schedule.initiated_here;
        let initiator = schedule.initiator.as_str().to_string();
        let key = (initiator.clone(), schedule.id.clone());
        self.playbacks.insert(key, (self.seq, schedule));
        if here {
            self.evict(MAX_PLAYBACKS, |s| s.initiated_here);
        } else {
            self.evict(MAX_RECEIVED_PER_DEVICE, |s| {
                !s.initiated_here && s.initiator.as_str() == initiator
            });
            self.evict(MAX_PLAYBACKS, |s| !s.initiated_here);
        }
    }

    /// Drops the oldest playbacks that match `which` until at most `cap` are left.
    fn evict(&mut self, cap: usize, which: impl Fn(&PlaybackSchedule) -> bool) {
        let mut matching: Vec<(u64, Key)> = self
            .playbacks
            .iter()
            .filter(|(_, (_, s))| which(s))
            .map(|(key, (seq, _))| (*seq, key.clone()))
            .collect();
        if matching.len() <= cap {
            return;
        }
        matching.sort();
        let excess = matching.len() - cap;
        for (_, key) in matching.into_iter().take(excess) {
            self.playbacks.remove(&key);
        }
    }

    /// Forgets received playbacks still waiting for a clock estimate of their initiator
    /// that came in more than [`PENDING_FOR_MS`] before `now_ms` (the system clock, as
    /// `created_at`); the number forgotten.
    fn prune(&mut self, now_ms: u64) -> usize {
        let before = self.playbacks.len();
        self.playbacks.retain(|_, (_, s)| {
            s.initiated_here
                || s.devices.first().map(|d| d.state) != Some(DeviceSchedule::Pending)
                || s.created_at.unix_ms().saturating_add(PENDING_FOR_MS) >= now_ms
        });
        before - self.playbacks.len()
    }

    /// The playback `id`: the one started here if there is one, else the newest received.
    fn find(&self, id: &str) -> Option<&PlaybackSchedule> {
        self.playbacks
            .values()
            .filter(|(_, s)| s.id == id)
            .max_by_key(|(seq, s)| (s.initiated_here, *seq))
            .map(|(_, s)| s)
    }
}

/// A fresh playback id: 16 random bytes in base58.
fn new_id() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("no randomness for a playback id: {e}")))?;
    Ok(bs58::encode(bytes).into_string())
}

impl Core {
    /// Answers a request of the service.
    pub(crate) async fn handle_playback(&mut self, request: PlaybackRequest) {
        match request {
            PlaybackRequest::Start { playback, reply } => {
                let result = self.start_playback(playback).await;
                let _ = reply.send(result);
            }
            PlaybackRequest::Get { id, reply } => {
                let found = self.playback.find(&id).cloned().ok_or_else(|| {
                    Error::NotFound(format!(
                        "no playback {:?} was started or received here",
                        id.chars().take(64).collect::<String>()
                    ))
                });
                let _ = reply.send(found);
            }
            PlaybackRequest::List { reply } => {
                let mut all: Vec<_> = self.playback.playbacks.values().cloned().collect();
                all.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
                let _ = reply.send(Ok(all.into_iter().map(|(_, s)| s).collect()));
            }
            PlaybackRequest::Clocks { reply } => {
                let all = self.playback.clock.all();
                let _ = reply.send(Ok(all.into_iter().map(|(p, e)| (p.into(), e)).collect()));
            }
            #[cfg(feature = "test-hooks")]
            PlaybackRequest::Skew { ms, reply } => {
                self.playback.skew_us = ms.saturating_mul(1000);
                // Samples taken before are of another clock.
                self.playback.clock = ClockBook::default();
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Queues a clock-lane message for `peer`; a full queue sheds it (the next probe or
    /// resend follows).
    async fn send_clock(&mut self, peer: PeerId, message: &ClockMessage) {
        let bytes = match message.encode() {
            Ok(bytes) => self.ephemeral_clock_frame(bytes),
            Err(error) => {
                tracing::warn!(%error, "cannot encode a clock message");
                return;
            }
        };
        let len = bytes.len();
        match self.net.send_ephemeral(peer, bytes).await {
            Ok(hearth_net::SendOutcome::Queued) => self.metrics.ephemeral(false, len),
            Ok(outcome) => tracing::debug!(%peer, ?outcome, "clock message not queued"),
            Err(error) => tracing::debug!(%peer, %error, "clock message not sent"),
        }
    }

    /// Sends `peer` a probe, timed as late as possible.
    async fn probe_clock(&mut self, peer: &str) {
        let Some(net) = self.peers.admitted.get(peer).copied() else {
            return;
        };
        let t1 = self.playback.now_us();
        let mono = self.playback.mono_us();
        if let Some(nonce) = self.playback.clock.probe(peer, t1, mono) {
            self.send_clock(net, &ClockMessage::Probe { nonce }).await;
        }
    }

    /// With every heartbeat: a probe to each admitted device of the home, and playbacks
    /// started here sent again to targets that have not reported, until shortly after
    /// their start.
    pub(crate) async fn playback_tick(&mut self) {
        let peers: Vec<String> = self.peers.admitted.keys().cloned().collect();
        for peer in &peers {
            self.probe_clock(peer).await;
        }
        let forgotten = self.playback.prune(now_ms());
        if forgotten > 0 {
            tracing::debug!(
                forgotten,
                "received playbacks that never got a clock estimate forgotten"
            );
        }
        let now = self.playback.now_ms();
        let mut resend = Vec::new();
        for (_, s) in self.playback.playbacks.values() {
            if !s.initiated_here || s.start_at.saturating_add(RESEND_FOR_MS) < now {
                continue;
            }
            for d in &s.devices {
                if d.state == DeviceSchedule::Pending
                    && let Some(net) = self.peers.admitted.get(d.device_id.as_str())
                {
                    let start = ClockMessage::Start {
                        id: s.id.clone(),
                        media: s.media.clone(),
                        start_at_ms: s.start_at,
                    };
                    resend.push((*net, start));
                }
            }
        }
        for (net, message) in resend {
            self.send_clock(net, &message).await;
        }
    }

    /// A device of the home was admitted: probes start at once.
    pub(crate) async fn on_playback_peer_up(&mut self, peer: &str) {
        self.probe_clock(peer).await;
    }

    /// A device left: its estimate goes, as its clock may change before it returns.
    pub(crate) fn on_playback_peer_down(&mut self, peer: &str) {
        self.playback.clock.forget(peer);
    }

    /// Starts a playback here: see [`super::Playback::start`].
    async fn start_playback(&mut self, new: NewPlayback) -> Result<PlaybackSchedule, Error> {
        super::check_media(&new.media).map_err(Error::Invalid)?;
        super::check_start(new.start_at, self.playback.now_ms()).map_err(Error::Invalid)?;
        if new.device_ids.len() > MAX_PLAYBACK_DEVICES {
            return Err(Error::Invalid(format!(
                "{} devices; at most {MAX_PLAYBACK_DEVICES} are allowed",
                new.device_ids.len()
            )));
        }
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .map_err(doc_err)?;
        let targets: Vec<String> = if new.device_ids.is_empty() {
            devices
                .iter()
                .filter(|(peer, record)| {
                    record.revoked_at.is_none() && !self.revocations.contains(peer.as_str())
                })
                .map(|(peer, _)| peer.clone())
                .take(MAX_PLAYBACK_DEVICES)
                .collect()
        } else {
            self.resolve_event_targets(&new.device_ids)?
        };
        let me = self.peer_id.clone();
        let schedule = PlaybackSchedule {
            id: new_id()?,
            media: new.media,
            start_at: new.start_at,
            initiator: me.as_str().into(),
            initiated_here: true,
            devices: targets
                .iter()
                .map(|peer| {
                    let here = *peer == me;
                    PlaybackDevice {
                        device_id: peer.as_str().into(),
                        name: devices
                            .get(peer)
                            .map(|d| d.name.clone())
                            .unwrap_or_default(),
                        state: if here {
                            DeviceSchedule::Scheduled
                        } else {
                            DeviceSchedule::Pending
                        },
                        local_start_at: here.then_some(new.start_at),
                        offset_ms: here.then_some(0.0),
                        uncertainty_ms: here.then_some(0.0),
                    }
                })
                .collect(),
            created_at: Timestamp::from_unix_ms(now_ms()),
        };
        self.playback.keep(schedule.clone());
        if targets.contains(&me) {
            self.emit_event(sync_event(SYNC_PLAYBACK, &schedule, &me, None));
        }
        let start = ClockMessage::Start {
            id: schedule.id.clone(),
            media: schedule.media.clone(),
            start_at_ms: schedule.start_at,
        };
        for peer in targets.iter().filter(|p| **p != me) {
            if let Some(net) = self.peers.admitted.get(peer).copied() {
                self.send_clock(net, &start).await;
            }
        }
        tracing::info!(id = %schedule.id, devices = targets.len(), start_at = schedule.start_at,
            "synchronised playback started");
        Ok(schedule)
    }

    /// A clock-lane message from admitted device `peer`, which arrived at `received_us`
    /// by this device's playback clock and `received_mono` by its monotonic one
    /// ([`PlaybackState::mono_us`]). Only devices of this home use the lane.
    pub(crate) async fn on_clock_message(
        &mut self,
        peer: PeerId,
        own: bool,
        bytes: &[u8],
        received_us: i64,
        received_mono: i64,
    ) {
        let text = peer.to_base58();
        if !own {
            self.playback.dropped += 1;
            tracing::debug!(peer = %text, "clock message from a paired home's device ignored");
            return;
        }
        if let Verdict::Drop { log } = self.playback.limit.check(&text, now_ms()) {
            self.playback.dropped += 1;
            if let Some(dropped) = log {
                tracing::warn!(peer = %text, dropped, "a device sends clock messages faster than allowed; dropping them");
            }
            return;
        }
        let message = match ClockMessage::decode(bytes) {
            Ok(m) => m,
            Err(reason) => {
                self.playback.dropped += 1;
                tracing::warn!(peer = %text, %reason, len = bytes.len(), "clock message dropped");
                return;
            }
        };
        match message {
            ClockMessage::Probe { nonce } => {
                let t3_us = self.playback.now_us();
                let answer = ClockMessage::Answer {
                    nonce,
                    t2_us: received_us,
                    t3_us,
                };
                self.send_clock(peer, &answer).await;
            }
            ClockMessage::Answer {
                nonce,
                t2_us,
                t3_us,
            } => match self
                .playback
                .clock
                .answer(&text, nonce, t2_us, t3_us, received_mono)
            {
                Taken::Sample { more } => {
                    if more {
                        self.probe_clock(&text).await;
                    }
                    self.schedule_waiting(&text).await;
                }
                Taken::Unknown => {
                    tracing::debug!(peer = %text, nonce, "clock answer to no outstanding probe")
                }
                Taken::Impossible => {
                    self.playback.dropped += 1;
                    tracing::warn!(peer = %text, "clock answer with impossible times dropped");
                }
            },
            ClockMessage::Start {
                id,
                media,
                start_at_ms,
            } => self.take_playback(&text, id, media, start_at_ms).await,
            ClockMessage::Scheduled {
                id,
                local_start_ms,
                offset_us,
                uncertainty_us,
            } => {
                let key = (self.peer_id.clone(), id);
                let Some((_, schedule)) = self.playback.playbacks.get_mut(&key) else {
                    return;
                };
                let Some(device) = schedule
                    .devices
                    .iter_mut()
                    .filter(|_| schedule.initiated_here)
                    .find(|d| d.device_id.as_str() == text)
                else {
                    self.playback.dropped += 1;
                    tracing::debug!(peer = %text, "a report for a playback it is not in");
                    return;
                };
                if device.state == DeviceSchedule::Scheduled {
                    return;
                }
                device.state = DeviceSchedule::Scheduled;
                device.local_start_at = Some(local_start_ms);
                device.offset_ms = Some(offset_us as f64 / 1000.0);
                device.uncertainty_ms = Some(uncertainty_us as f64 / 1000.0);
                let event = sync_event(SYNC_PLAYBACK_SCHEDULED, schedule, &text, Some(&text));
                self.emit_event(event);
            }
        }
    }

    /// A playback `peer` started for this device: kept, then scheduled when this device
    /// has an estimate of its clock (or once the first probe answers). A copy sent again
    /// gets the report again.
    async fn take_playback(&mut self, peer: &str, id: String, media: String, start_at: u64) {
        let me = self.peer_id.clone();
        let key = (peer.to_string(), id.clone());
        if let Some((_, known)) = self.playback.playbacks.get(&key) {
            if let Some(report) = report_of(known, &me)
                && let Some(net) = self.peers.admitted.get(peer).copied()
            {
                self.send_clock(net, &report).await;
            }
            return;
        }
        let schedule = PlaybackSchedule {
            id: id.clone(),
            media,
            start_at,
            initiator: peer.into(),
            initiated_here: false,
            devices: vec![PlaybackDevice {
                device_id: me.as_str().into(),
                name: self.device_name.clone(),
                state: DeviceSchedule::Pending,
                local_start_at: None,
                offset_ms: None,
                uncertainty_ms: None,
            }],
            created_at: Timestamp::from_unix_ms(now_ms()),
        };
        self.playback.keep(schedule);
        if self.playback.clock.estimate(peer).is_some() {
            self.schedule_waiting(peer).await;
        } else {
            self.probe_clock(peer).await;
        }
    }

    /// Schedules every playback from `initiator` still waiting here for an estimate of
    /// its clock, raises `coordination.sync_playback` for each and reports it back.
    async fn schedule_waiting(&mut self, initiator: &str) {
        let Some(estimate) = self.playback.clock.estimate(initiator) else {
            return;
        };
        let me = self.peer_id.clone();
        let now = self.playback.now_ms();
        let offset_us = (estimate.offset_ms * 1000.0).round() as i64;
        let mut reports = Vec::new();
        let mut stale = Vec::new();
        for (key, (_, schedule)) in self.playback.playbacks.iter_mut() {
            if schedule.initiated_here || schedule.initiator.as_str() != initiator {
                continue;
            }
            let Some(device) = schedule.devices.first_mut() else {
                continue;
            };
            if device.state != DeviceSchedule::Pending {
                continue;
            }
            let local = super::local_start(schedule.start_at, offset_us);
            if local.saturating_add(RESEND_FOR_MS) < now {
                // Long past: announcing it now would start it in the middle, or never.
                stale.push(key.clone());
                continue;
            }
            device.state = DeviceSchedule::Scheduled;
            device.local_start_at = Some(local);
            device.offset_ms = Some(estimate.offset_ms);
            device.uncertainty_ms = Some(estimate.uncertainty_ms);
            reports.push(schedule.clone());
        }
        for key in stale {
            tracing::debug!(id = %key.1, peer = %key.0, "a received playback whose start is long past dropped");
            self.playback.playbacks.remove(&key);
        }
        let net = self.peers.admitted.get(initiator).copied();
        for schedule in reports {
            self.emit_event(sync_event(SYNC_PLAYBACK, &schedule, &me, Some(initiator)));
            tracing::info!(id = %schedule.id, local_start_at = ?schedule.devices[0].local_start_at,
                offset_ms = estimate.offset_ms, uncertainty_ms = estimate.uncertainty_ms,
                "synchronised playback scheduled");
            // An initiator gone meanwhile gets the report when it sends the playback again.
            if let (Some(net), Some(report)) = (net, report_of(&schedule, &me)) {
                self.send_clock(net, &report).await;
            }
        }
    }
}

/// The report of device `me` on `schedule`, once it is scheduled there.
fn report_of(schedule: &PlaybackSchedule, me: &str) -> Option<ClockMessage> {
    let d = schedule
        .devices
        .iter()
        .find(|d| d.device_id.as_str() == me && d.state == DeviceSchedule::Scheduled)?;
    Some(ClockMessage::Scheduled {
        id: schedule.id.clone(),
        local_start_ms: d.local_start_at?,
        offset_us: (d.offset_ms? * 1000.0).round() as i64,
        uncertainty_us: (d.uncertainty_ms? * 1000.0).round().max(0.0) as u64,
    })
}

/// Event `name` for `device` of `schedule`: its local start, the offset and uncertainty
/// it used, with the playback's own fields.
fn sync_event(
    name: &'static str,
    schedule: &PlaybackSchedule,
    device: &str,
    from_peer: Option<&str>,
) -> Event {
    let d = schedule
        .devices
        .iter()
        .find(|d| d.device_id.as_str() == device);
    Event::Coordination {
        name,
        subject: schedule.id.clone(),
        data: serde_json::json!({
            "playback_id": schedule.id,
            "media": schedule.media,
            "start_at": schedule.start_at,
            "initiator": schedule.initiator,
            "device_id": device,
            "local_start_at": d.and_then(|d| d.local_start_at),
            "offset_ms": d.and_then(|d| d.offset_ms),
            "uncertainty_ms": d.and_then(|d| d.uncertainty_ms),
        }),
        from_peer: from_peer.map(DeviceId::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::TestCore;

    async fn schedules(t: &TestCore) -> Vec<PlaybackSchedule> {
        t.core
            .call(|reply| PlaybackRequest::List { reply })
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_received_playback_waits_for_a_clock_sample_then_starts_at_the_converted_time() {
        let t = TestCore::start("den").await;
        let mut events = t.events();
        let peer = PeerId::random();
        let text = peer.to_base58();
        let skew = 2_000_000i64;
        let t1 = 1_000_000_000i64;
        let nonce = std::sync::Arc::new(std::sync::Mutex::new(0));
        let seen = nonce.clone();
        // A minute ahead by the initiator's clock.
        let start_at = now_ms() + 60_000;
        t.on_core(move |core| {
            Box::pin(async move {
                core.peers.admitted.insert(text.clone(), peer);
                let start = ClockMessage::Start {
                    id: "5Kq9wXyzAbCdEfGhJk".into(),
                    media: "song".into(),
                    start_at_ms: start_at,
                }
                .encode()
                .unwrap();
                core.on_clock_message(peer, true, &start, 0, 0).await;
                // No estimate yet: kept, pending, and a probe went out.
                *seen.lock().unwrap() = core.playback.clock.probe(&text, t1, t1).unwrap();
            })
        })
        .await;
        let listed = schedules(&t).await;
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].initiated_here);
        assert_eq!(listed[0].devices[0].state, DeviceSchedule::Pending);
        assert!(events.try_recv().is_err());

        let nonce = *nonce.lock().unwrap();
        t.on_core(move |core| {
            Box::pin(async move {
                // 1 ms each way, the peer 2 s ahead.
                let t2 = t1 + 1000 + skew;
                let t3 = t2 + 10;
                let answer = ClockMessage::Answer {
                    nonce,
                    t2_us: t2,
                    t3_us: t3,
                }
                .encode()
                .unwrap();
                let t4 = t3 - skew + 1000;
                core.on_clock_message(peer, true, &answer, t4, t4).await;
            })
        })
        .await;
        let Event::Coordination {
            name,
            subject,
            data,
            ..
        } = events.recv().await.unwrap()
        else {
            panic!("not a coordination event");
        };
        assert_eq!(
            (name, subject.as_str()),
            (SYNC_PLAYBACK, "5Kq9wXyzAbCdEfGhJk")
        );
        assert_eq!(data["local_start_at"], start_at - 2000);
        assert_eq!(data["offset_ms"], 2000.0);
        assert_eq!(data["uncertainty_ms"], 1.0);
        let listed = schedules(&t).await;
        assert_eq!(listed[0].devices[0].state, DeviceSchedule::Scheduled);
        assert_eq!(listed[0].devices[0].local_start_at, Some(start_at - 2000));
        let clocks = t
            .core
            .call(|reply| PlaybackRequest::Clocks { reply })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(clocks.len(), 1);
        assert_eq!(clocks[0].1.offset_ms, 2000.0);
        t.stop().await;
    }

    #[tokio::test]
    async fn malformed_foreign_and_flooding_messages_are_dropped() {
        let t = TestCore::start("den").await;
        let peer = PeerId::random();
        let dropped = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = dropped.clone();
        t.on_core(move |core| {
            Box::pin(async move {
                core.peers.admitted.insert(peer.to_base58(), peer);
                let probe = ClockMessage::Probe { nonce: 1 }.encode().unwrap();
                core.on_clock_message(peer, false, &probe, 0, 0).await;
                out.lock().unwrap().push(core.playback.dropped);
                core.on_clock_message(peer, true, b"\xff\x00", 0, 0).await;
                out.lock().unwrap().push(core.playback.dropped);
                // A report for a playback that does not exist changes nothing.
                let report = ClockMessage::Scheduled {
                    id: "5Kq9wXyzAbCdEfGhJk".into(),
                    local_start_ms: 1,
                    offset_us: 0,
                    uncertainty_us: 0,
                }
                .encode()
                .unwrap();
                core.on_clock_message(peer, true, &report, 0, 0).await;
                let before = core.playback.dropped;
                for _ in 0..(crate::propagation::limit::EVENT_BURST * 2) {
                    core.on_clock_message(peer, true, &probe, 0, 0).await;
                }
                out.lock().unwrap().push(core.playback.dropped - before);
            })
        })
        .await;
        let dropped = dropped.lock().unwrap().clone();
        assert_eq!(dropped[0], 1, "a paired home's device was heard");
        assert_eq!(dropped[1], 2, "garbage was taken");
        assert!(dropped[2] >= 50, "{dropped:?}: the flood was not limited");
        assert!(schedules(&t).await.is_empty());
        t.stop().await;
    }

    #[tokio::test]
    async fn a_playback_started_here_is_scheduled_here_and_bad_ones_are_refused() {
        let t = TestCore::start("den").await;
        let mut events = t.events();
        let start = |playback: NewPlayback| {
            t.core
                .call(move |reply| PlaybackRequest::Start { playback, reply })
        };
        let at = now_ms() + 77_000;
        let schedule = start(NewPlayback {
            media: "radio".into(),
            start_at: at,
            device_ids: vec![],
        })
        .await
        .unwrap()
        .unwrap();
        assert!(schedule.initiated_here);
        assert_eq!(schedule.devices.len(), 1);
        assert_eq!(schedule.devices[0].device_id.as_str(), t.peer_id);
        assert_eq!(schedule.devices[0].name, "den");
        assert_eq!(schedule.devices[0].local_start_at, Some(at));
        let Event::Coordination { name, data, .. } = events.recv().await.unwrap() else {
            panic!("not a coordination event");
        };
        assert_eq!(name, SYNC_PLAYBACK);
        assert_eq!(data["local_start_at"], at);
        for (bad, invalid) in [
            (
                NewPlayback {
                    media: " ".into(),
                    start_at: at,
                    device_ids: vec![],
                },
                true,
            ),
            (
                NewPlayback {
                    media: "m".into(),
                    start_at: at,
                    device_ids: vec!["x".into(); MAX_PLAYBACK_DEVICES + 1],
                },
                true,
            ),
            (
                NewPlayback {
                    media: "m".into(),
                    start_at: 1,
                    device_ids: vec![],
                },
                true,
            ),
            (
                NewPlayback {
                    media: "m".into(),
                    start_at: at + super::super::MAX_START_DISTANCE_MS,
                    device_ids: vec![],
                },
                true,
            ),
            (
                NewPlayback {
                    media: "m".into(),
                    start_at: at,
                    device_ids: vec!["nobody".into()],
                },
                false,
            ),
        ] {
            let result = start(bad).await.unwrap();
            match result {
                Err(Error::Invalid(_)) if invalid => {}
                Err(Error::NotFound(_)) if !invalid => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(schedules(&t).await.len(), 1);
        t.stop().await;
    }

    fn schedule(initiator: &str, id: &str, here: bool, created_ms: u64) -> PlaybackSchedule {
        PlaybackSchedule {
            id: id.into(),
            media: "m".into(),
            start_at: 1,
            initiator: initiator.into(),
            initiated_here: here,
            devices: vec![PlaybackDevice {
                device_id: "me".into(),
                name: String::new(),
                state: if here {
                    DeviceSchedule::Scheduled
                } else {
                    DeviceSchedule::Pending
                },
                local_start_at: None,
                offset_ms: None,
                uncertainty_ms: None,
            }],
            created_at: Timestamp::from_unix_ms(created_ms),
        }
    }

    fn kept(state: &PlaybackState, initiator: &str) -> Vec<String> {
        let mut ids: Vec<_> = state
            .playbacks
            .keys()
            .filter(|(i, _)| i == initiator)
            .map(|(_, id)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn one_device_cannot_evict_other_devices_playbacks_or_ones_started_here() {
        let mut state = PlaybackState::default();
        state.keep(schedule("me", "mine", true, 0));
        state.keep(schedule("b", "b-one", false, 0));
        for i in 0..(MAX_PLAYBACKS * 2) {
            state.keep(schedule("a", &format!("a-{i:03}"), false, 0));
        }
        // Only a's newest few; b's and this device's stay.
        let a: Vec<String> = (MAX_PLAYBACKS * 2 - MAX_RECEIVED_PER_DEVICE..MAX_PLAYBACKS * 2)
            .map(|i| format!("a-{i:03}"))
            .collect();
        assert_eq!(kept(&state, "a"), a);
        assert_eq!(kept(&state, "b"), vec!["b-one".to_string()]);
        assert_eq!(kept(&state, "me"), vec!["mine".to_string()]);
        // Many devices together are bounded too, still without touching this device's.
        for d in 0..MAX_PLAYBACKS {
            for i in 0..MAX_RECEIVED_PER_DEVICE {
                state.keep(schedule(&format!("d{d}"), &format!("x{i}"), false, 0));
            }
        }
        let received = state
            .playbacks
            .values()
            .filter(|(_, s)| !s.initiated_here)
            .count();
        assert_eq!(received, MAX_PLAYBACKS);
        assert_eq!(kept(&state, "me"), vec!["mine".to_string()]);
        // Started here: the oldest of those go past the cap, never a received one.
        for i in 0..MAX_PLAYBACKS {
            state.keep(schedule("me", &format!("m{i:02}"), true, 0));
        }
        assert_eq!(kept(&state, "me").len(), MAX_PLAYBACKS);
        assert!(!kept(&state, "me").contains(&"mine".to_string()));
        assert_eq!(state.playbacks.len(), 2 * MAX_PLAYBACKS);
    }

    #[test]
    fn the_same_id_from_two_devices_is_two_playbacks() {
        let mut state = PlaybackState::default();
        state.keep(schedule("mallory", "shared", false, 0));
        state.keep(schedule("alice", "shared", false, 0));
        state.keep(schedule("me", "shared", true, 0));
        assert_eq!(state.playbacks.len(), 3);
        assert_eq!(state.find("shared").unwrap().initiator.as_str(), "me");
        state
            .playbacks
            .remove(&("me".to_string(), "shared".to_string()));
        assert_eq!(state.find("shared").unwrap().initiator.as_str(), "alice");
        assert!(state.find("other").is_none());
    }

    #[test]
    fn received_playbacks_waiting_too_long_for_a_clock_are_forgotten() {
        let mut state = PlaybackState::default();
        state.keep(schedule("a", "old-pending", false, 1_000));
        state.keep(schedule("a", "new-pending", false, 1_000 + PENDING_FOR_MS));
        let mut scheduled = schedule("a", "old-scheduled", false, 1_000);
        scheduled.devices[0].state = DeviceSchedule::Scheduled;
        state.keep(scheduled);
        state.keep(schedule("me", "old-mine", true, 1_000));
        assert_eq!(state.prune(1_000 + PENDING_FOR_MS), 0);
        assert_eq!(state.prune(1_001 + PENDING_FOR_MS), 1);
        assert_eq!(
            kept(&state, "a"),
            vec!["new-pending".to_string(), "old-scheduled".to_string()]
        );
        assert_eq!(kept(&state, "me"), vec!["old-mine".to_string()]);
    }

    #[tokio::test]
    async fn a_start_long_past_is_dropped_and_an_id_sent_first_by_another_device_takes_nothing() {
        let t = TestCore::start("den").await;
        let mut events = t.events();
        let (alice, mallory) = (PeerId::random(), PeerId::random());
        let start_at = now_ms() + 60_000;
        t.on_core(move |core| {
            Box::pin(async move {
                for peer in [alice, mallory] {
                    let text = peer.to_base58();
                    core.peers.admitted.insert(text.clone(), peer);
                    // An estimate of each: clocks in step, 1 ms round trip.
                    let now = core.playback.now_us();
                    let nonce = core.playback.clock.probe(&text, now, 0).unwrap();
                    core.playback
                        .clock
                        .answer(&text, nonce, now + 500, now + 500, 1000);
                }
                let start = |start_at_ms: u64, media: &str| {
                    ClockMessage::Start {
                        id: "5Kq9wXyzAbCdEfGhJk".into(),
                        media: media.into(),
                        start_at_ms,
                    }
                    .encode()
                    .unwrap()
                };
                // An hour ago: not announced, not kept.
                let past = start(now_ms() - 3_600_000, "stale");
                core.on_clock_message(alice, true, &past, 0, 0).await;
                // Mallory sends alice's id first; alice's own start still counts.
                let theirs = start(start_at, "mallory's");
                core.on_clock_message(mallory, true, &theirs, 0, 0).await;
                let ours = start(start_at, "alice's");
                core.on_clock_message(alice, true, &ours, 0, 0).await;
            })
        })
        .await;
        let mut announced = Vec::new();
        for _ in 0..2 {
            let Event::Coordination { name, data, .. } = events.recv().await.unwrap() else {
                panic!("not a coordination event");
            };
            assert_eq!(name, SYNC_PLAYBACK);
            announced.push((data["initiator"].clone(), data["media"].clone()));
        }
        assert!(
            events.try_recv().is_err(),
            "the stale playback was announced"
        );
        assert_eq!(
            announced,
            vec![
                (
                    serde_json::json!(mallory.to_base58()),
                    serde_json::json!("mallory's")
                ),
                (
                    serde_json::json!(alice.to_base58()),
                    serde_json::json!("alice's")
                ),
            ]
        );
        let listed = schedules(&t).await;
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|s| s.media != "stale"));
        t.stop().await;
    }
}
