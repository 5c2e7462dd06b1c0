//! Typed view of a group `activity` document (trivia, story, sing-along,
//! synchronised playback across devices of one home).
//!
//! Layout under the root key `activity`:
//!
//! | key | type |
//! | --- | --- |
//! | `type`, `initiator`, `state` | string |
//! | `devices` | list of string (the devices taking part, PeerIds) |
//! | `config` | string: a JSON object, at most [`MAX_ACTIVITY_CONFIG_BYTES`] |
//! | `room`, `reason` | optional string |
//! | `step` | uint |
//! | `created_at`, `started_at`, `ended_at` | uint ms (the last two optional) |
//! | `acks` | map device -> uint ms, when it acknowledged the start |
//! | `scores` | map device -> counter |
//! | `missing` | list of string: devices that did not acknowledge in time |
//! | `final_scores` | optional map device -> int, written when it ends |
//!
//! Every device's counter is created with the document, by one writer, so
//! no two replicas ever create the same counter concurrently (which would
//! lose one side's increments); after that, increments from any device add
//! up. The state machine (who may move it, and when) is the activities
//! service's job; this view checks transitions and shapes.

use std::collections::BTreeMap;
use std::fmt::Debug;

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};

use super::fields::{check_name, req_counter, req_list};
use super::room::expect_kind;
use super::{DocKind, Header, am, join, opt_str, opt_u64, req_map, req_str, req_u64};
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::ids::{DocId, KeyEpoch};

/// Root key of the activity map.
pub const ACTIVITY_KEY: &str = "activity";
/// Largest config accepted, in bytes of JSON text.
pub const MAX_ACTIVITY_CONFIG_BYTES: usize = 8 * 1024;
/// Most devices one activity may name.
pub const MAX_ACTIVITY_DEVICES: usize = 32;

/// Where an activity is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ActivityPhase {
    /// Made, not yet sent to its devices.
    Pending,
    /// Sent; waiting for every device to acknowledge.
    Starting,
    /// Every device acknowledged; running.
    Active,
    /// Held.
    Paused,
    /// Being ended; scores are being frozen.
    Ending,
    /// Over (see the reason).
    Ended,
}

impl ActivityPhase {
    /// Stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Ending => "ending",
            Self::Ended => "ended",
        }
    }

    /// Inverse of [`ActivityPhase::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "starting" => Self::Starting,
            "active" => Self::Active,
            "paused" => Self::Paused,
            "ending" => Self::Ending,
            "ended" => Self::Ended,
            _ => return None,
        })
    }

    /// Whether the activity may move from this phase to `to`.
    pub fn may_become(self, to: Self) -> bool {
        use ActivityPhase::*;
        matches!(
            (self, to),
            (Pending, Starting)
                | (Starting, Active)
                | (Starting, Ended)
                | (Active, Paused)
                | (Paused, Active)
                | (Active | Paused | Starting, Ending)
                | (Ending, Ended)
        )
    }
}

/// The activity, after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Activity {
    /// `trivia`, `story`, `sing_along`, `sync_playback` (the service checks the set).
    pub kind: String,
    /// The device that started it and moves its state.
    pub initiator: String,
    /// The devices taking part.
    pub devices: Vec<String>,
    /// Its configuration, as JSON text (an object).
    pub config: String,
    /// The room it runs in, if any.
    pub room: Option<String>,
    /// Where it is.
    pub phase: ActivityPhase,
    /// Why it ended (`ended`, `no_ack`).
    pub reason: Option<String>,
    /// The current step.
    pub step: u64,
    /// When it was made, started, ended (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When every device had acknowledged.
    pub started_at_ms: Option<u64>,
    /// When it ended.
    pub ended_at_ms: Option<u64>,
    /// Devices that acknowledged the start, with when.
    pub acks: BTreeMap<String, u64>,
    /// Score per device (counters).
    pub scores: BTreeMap<String, i64>,
    /// Devices that did not acknowledge in time.
    pub missing: Vec<String>,
    /// Scores as frozen at the end.
    pub final_scores: Option<BTreeMap<String, i64>>,
}

impl Activity {
    /// Reads and validates the activity view of `doc`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let a = req_map(doc, &ROOT, ACTIVITY_KEY, ACTIVITY_KEY)?;
        let kind = req_str(doc, &a, "type", "activity.type")?;
        check_name("activity.type", &kind)?;
        let initiator = req_str(doc, &a, "initiator", "activity.initiator")?;
        check_name("activity.initiator", &initiator)?;
        let devices = read_names(doc, &a, "devices", MAX_ACTIVITY_DEVICES)?;
        let config = req_str(doc, &a, "config", "activity.config")?;
        check_config(&config)?;
        let room = opt_str(doc, &a, "room", "activity.room")?;
        let state = req_str(doc, &a, "state", "activity.state")?;
        let phase = ActivityPhase::parse(&state)
            .ok_or_else(|| Error::schema("activity.state", format!("unknown state {state:?}")))?;
        let reason = opt_str(doc, &a, "reason", "activity.reason")?;
        for (path, v) in [("activity.room", &room), ("activity.reason", &reason)] {
            if let Some(v) = v {
                check_name(path, v)?;
            }
        }
        let acks = read_map(doc, &a, "acks", |doc, m, k, path| req_u64(doc, m, k, path))?;
        let scores = read_map(doc, &a, "scores", |doc, m, k, path| {
            req_counter(doc, m, k, path)
        })?;
        let final_scores =
            match super::fields::opt_map(doc, &a, "final_scores", "activity.final_scores")? {
                None => None,
                Some(_) => Some(read_map(doc, &a, "final_scores", |doc, m, k, path| {
                    req_counter(doc, m, k, path)
                })?),
            };
        Ok(Self {
            kind,
            initiator,
            devices,
            config,
            room,
            phase,
            reason,
            step: req_u64(doc, &a, "step", "activity.step")?,
            created_at_ms: req_u64(doc, &a, "created_at", "activity.created_at")?,
            started_at_ms: opt_u64(doc, &a, "started_at", "activity.started_at")?,
            ended_at_ms: opt_u64(doc, &a, "ended_at", "activity.ended_at")?,
            acks,
            scores,
            missing: read_names(doc, &a, "missing", MAX_ACTIVITY_DEVICES)?,
            final_scores,
        })
    }
}

fn check_config(text: &str) -> Result<()> {
    // Length before parsing: the parse allocates in proportion to the input.
    if text.len() > MAX_ACTIVITY_CONFIG_BYTES {
        return Err(Error::schema(
            "activity.config",
            format!(
                "is {} bytes, over the cap of {MAX_ACTIVITY_CONFIG_BYTES}",
                text.len()
            ),
        ));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(Error::schema("activity.config", "expected a JSON object")),
        Err(e) => Err(Error::schema(
            "activity.config",
            format!("invalid JSON: {e}"),
        )),
    }
}

fn read_names<D: ReadDoc>(doc: &D, a: &ObjId, key: &str, max: usize) -> Result<Vec<String>> {
    let path = join(ACTIVITY_KEY, key);
    let list = req_list(doc, a, key, &path)?;
    let len = doc.length(&list);
    if len > max {
        return Err(Error::schema(&path, format!("{len} entries, over {max}")));
    }
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        let p = join(&path, &i.to_string());
        match doc
            .get(&list, i)
            .map_err(|e| Error::schema(&p, e.to_string()))?
        {
            Some((Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Str(t) => {
                    check_name(&p, t)?;
                    out.push(t.to_string());
                }
                _ => return Err(Error::schema(&p, "expected a string")),
            },
            _ => return Err(Error::schema(&p, "expected a string")),
        }
    }
    Ok(out)
}

fn read_map<D: ReadDoc, V>(
    doc: &D,
    a: &ObjId,
    key: &str,
    value: impl Fn(&D, &ObjId, &str, &str) -> Result<V>,
) -> Result<BTreeMap<String, V>> {
    let path = join(ACTIVITY_KEY, key);
    let m = req_map(doc, a, key, &path)?;
    // A peer could add entries; more than the devices cap is malformed.
    if doc.length(&m) > MAX_ACTIVITY_DEVICES {
        return Err(Error::schema(&path, "too many entries"));
    }
    let mut out = BTreeMap::new();
    for k in doc.keys(&m) {
        let p = join(&path, &k);
        check_name(&p, &k)?;
        out.insert(k.clone(), value(doc, &m, &k, &p)?);
    }
    Ok(out)
}

/// What a new activity is.
#[derive(Clone, Debug)]
pub struct NewActivity<'a> {
    /// Its type.
    pub kind: &'a str,
    /// The device starting it.
    pub initiator: &'a str,
    /// The devices taking part (the initiator may be one).
    pub devices: &'a [String],
    /// Its configuration, JSON text of an object.
    pub config: &'a str,
    /// Its room, if any.
    pub room: Option<&'a str>,
}

fn init<T: Transactable>(doc: &mut T, new: &NewActivity<'_>, now_ms: u64) -> Result<()> {
    check_name("activity.type", new.kind)?;
    check_name("activity.initiator", new.initiator)?;
    check_config(new.config)?;
    if new.devices.is_empty() || new.devices.len() > MAX_ACTIVITY_DEVICES {
        return Err(Error::schema(
            "activity.devices",
            format!("1 to {MAX_ACTIVITY_DEVICES} devices"),
        ));
    }
    let a = doc
        .put_object(ROOT, ACTIVITY_KEY, ObjType::Map)
        .map_err(am)?;
    doc.put(&a, "type", new.kind).map_err(am)?;
    doc.put(&a, "initiator", new.initiator).map_err(am)?;
    let list = doc.put_object(&a, "devices", ObjType::List).map_err(am)?;
    let scores = doc.put_object(&a, "scores", ObjType::Map).map_err(am)?;
    for (i, d) in new.devices.iter().enumerate() {
        check_name(&join("activity.devices", &i.to_string()), d)?;
        doc.insert(&list, i, d.as_str()).map_err(am)?;
        doc.put(&scores, d.as_str(), ScalarValue::counter(0))
            .map_err(am)?;
    }
    doc.put(&a, "config", new.config).map_err(am)?;
    if let Some(room) = new.room {
        check_name("activity.room", room)?;
        doc.put(&a, "room", room).map_err(am)?;
    }
    doc.put(&a, "state", ActivityPhase::Pending.as_str())
        .map_err(am)?;
    doc.put(&a, "step", ScalarValue::Uint(0)).map_err(am)?;
    doc.put(&a, "created_at", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    doc.put_object(&a, "acks", ObjType::Map).map_err(am)?;
    doc.put_object(&a, "missing", ObjType::List).map_err(am)?;
    Ok(())
}

fn activity_map<T: Transactable>(doc: &mut T) -> Result<ObjId> {
    req_map(doc, &ROOT, ACTIVITY_KEY, ACTIVITY_KEY)
}

/// Moves the activity to `to`, refusing a move its state machine does not
/// allow. Entering `active` the first time stamps `started_at`; entering
/// `ended` stamps `ended_at`, records `reason` and freezes the scores.
pub fn transition<T: Transactable>(
    doc: &mut T,
    to: ActivityPhase,
    reason: Option<&str>,
    missing: &[String],
    now_ms: u64,
) -> Result<Activity> {
    let current = Activity::read(doc)?;
    if !current.phase.may_become(to) {
        return Err(Error::Refused {
            what: "activity",
            reason: format!(
                "the activity is {}; it cannot become {}",
                current.phase.as_str(),
                to.as_str()
            ),
        });
    }
    let a = activity_map(doc)?;
    doc.put(&a, "state", to.as_str()).map_err(am)?;
    if to == ActivityPhase::Active && current.started_at_ms.is_none() {
        doc.put(&a, "started_at", ScalarValue::Uint(now_ms))
            .map_err(am)?;
    }
    if to == ActivityPhase::Ended {
        if let Some(reason) = reason {
            check_name("activity.reason", reason)?;
            doc.put(&a, "reason", reason).map_err(am)?;
        }
        doc.put(&a, "ended_at", ScalarValue::Uint(now_ms))
            .map_err(am)?;
        let list = req_list(doc, &a, "missing", "activity.missing")?;
        for (i, d) in missing.iter().take(MAX_ACTIVITY_DEVICES).enumerate() {
            doc.insert(&list, i, d.as_str()).map_err(am)?;
        }
        let f = doc
            .put_object(&a, "final_scores", ObjType::Map)
            .map_err(am)?;
        for (d, score) in &current.scores {
            doc.put(&f, d.as_str(), *score).map_err(am)?;
        }
    }
    Activity::read(doc)
}

/// Records `device`'s acknowledgement of the start; false when it had
/// already acknowledged. Only a device the activity names may.
pub fn acknowledge<T: Transactable>(doc: &mut T, device: &str, now_ms: u64) -> Result<bool> {
    let current = Activity::read(doc)?;
    if !current.devices.iter().any(|d| d == device) {
        return Err(Error::Refused {
            what: "activity",
            reason: format!("{device} is not a device of this activity"),
        });
    }
    if current.acks.contains_key(device) {
        return Ok(false);
    }
    let a = activity_map(doc)?;
    let acks = req_map(doc, &a, "acks", "activity.acks")?;
    doc.put(&acks, device, ScalarValue::Uint(now_ms))
        .map_err(am)?;
    Ok(true)
}

/// Moves to the next step; returns it.
pub fn advance<T: Transactable>(doc: &mut T) -> Result<u64> {
    let current = Activity::read(doc)?;
    if current.phase != ActivityPhase::Active {
        return Err(Error::Refused {
            what: "activity",
            reason: format!("the activity is {}, not active", current.phase.as_str()),
        });
    }
    let a = activity_map(doc)?;
    let step = current.step.saturating_add(1);
    doc.put(&a, "step", ScalarValue::Uint(step)).map_err(am)?;
    Ok(step)
}

/// Adds `delta` to `device`'s score counter; concurrent additions from
/// several replicas all count.
pub fn add_score<T: Transactable>(doc: &mut T, device: &str, delta: i64) -> Result<i64> {
    let current = Activity::read(doc)?;
    if current.phase != ActivityPhase::Active {
        return Err(Error::Refused {
            what: "activity",
            reason: format!("the activity is {}, not active", current.phase.as_str()),
        });
    }
    let Some(score) = current.scores.get(device) else {
        return Err(Error::Refused {
            what: "activity",
            reason: format!("{device} is not a device of this activity"),
        });
    };
    let a = activity_map(doc)?;
    let s = req_map(doc, &a, "scores", "activity.scores")?;
    doc.increment(&s, device, delta).map_err(am)?;
    Ok(score.saturating_add(delta))
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Creates an activity document, in the `pending` state.
    pub fn create_activity(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        new: &NewActivity<'_>,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Activity, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| init(doc, new, now_ms))
    }

    /// The validated activity view.
    pub fn activity(&self, id: DocId) -> Result<Activity> {
        expect_kind(self, id, DocKind::Activity)?;
        Activity::read(self.doc(id)?)
    }

    /// Runs `f` on the activity in one change.
    pub fn write_activity<R>(
        &mut self,
        id: DocId,
        now_ms: u64,
        f: impl FnOnce(&mut automerge::AutoCommit) -> Result<R>,
    ) -> Result<(R, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Activity)?;
        self.transact(id, now_ms, None, |doc, _, _| f(doc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;

    fn devices() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    fn doc() -> AutoCommit {
        let mut doc = AutoCommit::new();
        let devices = devices();
        let new = NewActivity {
            kind: "trivia",
            initiator: "a",
            devices: &devices,
            config: r#"{"rounds":3}"#,
            room: None,
        };
        init(&mut doc, &new, 1).unwrap();
        doc
    }

    #[test]
    fn the_state_machine_runs_start_to_end_and_freezes_scores() {
        let mut d = doc();
        let a = Activity::read(&d).unwrap();
        assert_eq!(a.phase, ActivityPhase::Pending);
        assert_eq!(a.scores.values().sum::<i64>(), 0);
        transition(&mut d, ActivityPhase::Starting, None, &[], 2).unwrap();
        assert!(acknowledge(&mut d, "b", 3).unwrap());
        assert!(!acknowledge(&mut d, "b", 4).unwrap(), "counted once");
        assert!(acknowledge(&mut d, "x", 4).is_err(), "not named");
        assert!(add_score(&mut d, "a", 1).is_err(), "not active yet");
        let a = transition(&mut d, ActivityPhase::Active, None, &[], 5).unwrap();
        assert_eq!(a.started_at_ms, Some(5));
        assert_eq!(advance(&mut d).unwrap(), 1);
        add_score(&mut d, "a", 3).unwrap();
        add_score(&mut d, "b", -1).unwrap();
        assert!(add_score(&mut d, "zz", 1).is_err());
        transition(&mut d, ActivityPhase::Paused, None, &[], 6).unwrap();
        assert!(advance(&mut d).is_err(), "no step while paused");
        assert!(transition(&mut d, ActivityPhase::Paused, None, &[], 6).is_err());
        transition(&mut d, ActivityPhase::Active, None, &[], 7).unwrap();
        transition(&mut d, ActivityPhase::Ending, None, &[], 8).unwrap();
        let a = transition(&mut d, ActivityPhase::Ended, Some("ended"), &[], 9).unwrap();
        let finals = a.final_scores.unwrap();
        assert_eq!((finals["a"], finals["b"], finals["c"]), (3, -1, 0));
        assert_eq!(a.started_at_ms, Some(5), "a resume does not restart it");
        assert!(transition(&mut d, ActivityPhase::Active, None, &[], 10).is_err());
    }

    #[test]
    fn a_start_without_every_ack_ends_no_ack_naming_who_was_missing() {
        let mut d = doc();
        transition(&mut d, ActivityPhase::Starting, None, &[], 2).unwrap();
        acknowledge(&mut d, "a", 3).unwrap();
        let a = transition(
            &mut d,
            ActivityPhase::Ended,
            Some("no_ack"),
            &["b".into(), "c".into()],
            4,
        )
        .unwrap();
        assert_eq!(a.reason.as_deref(), Some("no_ack"));
        assert_eq!(a.missing, ["b", "c"]);
        assert_eq!(a.started_at_ms, None);
    }

    #[test]
    fn concurrent_increments_from_two_replicas_add_up() {
        let mut one = doc();
        transition(&mut one, ActivityPhase::Starting, None, &[], 2).unwrap();
        transition(&mut one, ActivityPhase::Active, None, &[], 3).unwrap();
        let mut two = one.fork();
        for _ in 0..5 {
            add_score(&mut one, "b", 2).unwrap();
            add_score(&mut two, "b", 3).unwrap();
        }
        one.merge(&mut two).unwrap();
        assert_eq!(Activity::read(&one).unwrap().scores["b"], 25);
    }

    #[test]
    fn malformed_activities_from_a_peer_name_the_field() {
        let base = doc();
        let a_of = |d: &AutoCommit| d.get(ROOT, ACTIVITY_KEY).unwrap().unwrap().1;
        let check = |d: &AutoCommit, want: &str| {
            let got = Activity::read(d);
            assert!(
                matches!(got, Err(Error::Schema { ref path, .. }) if path == want),
                "{want}: {got:?}"
            );
        };
        let mut d = base.clone();
        let a = a_of(&d);
        d.put(&a, "state", "dancing").unwrap();
        check(&d, "activity.state");
        let mut d = base.clone();
        let a = a_of(&d);
        d.put(&a, "config", "[1]").unwrap();
        check(&d, "activity.config");
        d.put(&a, "config", "x".repeat(MAX_ACTIVITY_CONFIG_BYTES + 1))
            .unwrap();
        check(&d, "activity.config");
        let mut d = base.clone();
        let a = a_of(&d);
        let (_, s) = d.get(&a, "scores").unwrap().unwrap();
        d.put(&s, "b", "lots").unwrap();
        check(&d, "activity.scores.b");
        let mut d = base.clone();
        let a = a_of(&d);
        let (_, list) = d.get(&a, "devices").unwrap().unwrap();
        for i in 0..MAX_ACTIVITY_DEVICES {
            d.insert(&list, 3 + i, "more").unwrap();
        }
        check(&d, "activity.devices");
        let mut d = base.clone();
        let a = a_of(&d);
        let (_, list) = d.get(&a, "devices").unwrap().unwrap();
        d.insert(&list, 0, 5_i64).unwrap();
        check(&d, "activity.devices.0");
    }
}
