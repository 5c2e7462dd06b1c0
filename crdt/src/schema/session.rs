//! Typed view of a user `session` document: which device the session is
//! active on, the context that moves with it, and its handoff history.
//!
//! Layout under the root key `session`:
//!
//! | key | type |
//! | --- | --- |
//! | `user`, `active_device` | string |
//! | `persona` | optional string: who the assistant is in this session |
//! | `context` | string: a JSON object, at most [`MAX_CONTEXT_BYTES`] |
//! | `context_at` | uint ms, when the context was last saved |
//! | `handoffs` | list of map { `id`, `from`, `to`: string, `started_at`: uint ms, `finished_at`: optional uint ms, `outcome`: "pending" \| "completed" \| "rolled_back" } |
//!
//! The context is one JSON text rather than an Automerge map on purpose: it is
//! a snapshot taken on the source device and handed over whole, so merging
//! two snapshots key by key would produce a state no device ever had.
//!
//! The handoff protocol (prepare on the source, accept on the target,
//! acknowledge, roll back on timeout) is the session service's job; this view
//! records its steps.

use std::fmt::Debug;

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ROOT, ReadDoc, ScalarValue};
use serde_json::{Map, Value as Json};

use super::fields::{check_name, list_map, req_list, req_name};
use super::room::expect_kind;
use super::{DocKind, Header, am, join, opt_u64, req_map, req_str, req_u64};
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::ids::{DocId, KeyEpoch};

/// Root key of the session map.
pub const SESSION_KEY: &str = "session";

/// Largest context snapshot accepted, in bytes of JSON text.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;

/// Handoffs kept in the history; older finished ones are dropped on write.
pub const MAX_HANDOFF_HISTORY: usize = 64;

/// How a handoff ended, or that it has not yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffOutcome {
    /// Prepared on the source; not yet acknowledged.
    Pending,
    /// The target took over the session.
    Completed,
    /// Abandoned (timeout or refusal); the source kept the session.
    RolledBack,
}

impl HandoffOutcome {
    /// Stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            HandoffOutcome::Pending => "pending",
            HandoffOutcome::Completed => "completed",
            HandoffOutcome::RolledBack => "rolled_back",
        }
    }

    /// Inverse of [`HandoffOutcome::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => HandoffOutcome::Pending,
            "completed" => HandoffOutcome::Completed,
            "rolled_back" => HandoffOutcome::RolledBack,
            _ => return None,
        })
    }
}

/// One handoff of the session between devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handoff {
    /// Handoff id, chosen by the caller.
    pub id: String,
    /// Device the session left.
    pub from: String,
    /// Device the session went (or was to go) to.
    pub to: String,
    /// When it was prepared, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// When it finished, if it has.
    pub finished_at_ms: Option<u64>,
    /// How it ended.
    pub outcome: HandoffOutcome,
}

/// The session, after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// User the session belongs to.
    pub user: String,
    /// Device the session is active on.
    pub active_device: String,
    /// The persona the session runs with, if one was given.
    pub persona: Option<String>,
    /// Context snapshot.
    pub context: Map<String, Json>,
    /// When the context was saved, ms since the Unix epoch.
    pub context_at_ms: u64,
    /// Handoffs, oldest first.
    pub handoffs: Vec<Handoff>,
}

impl Session {
    /// Reads and validates the session view of `doc`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let s = req_map(doc, &ROOT, SESSION_KEY, SESSION_KEY)?;
        let user = req_name(doc, &s, "user", "session.user")?;
        let active_device = req_name(doc, &s, "active_device", "session.active_device")?;
        let persona = super::opt_str(doc, &s, "persona", "session.persona")?;
        if let Some(p) = &persona {
            check_name("session.persona", p)?;
        }
        let text = req_str(doc, &s, "context", "session.context")?;
        let context = parse_context(&text)?;
        let context_at_ms = req_u64(doc, &s, "context_at", "session.context_at")?;
        let list = req_list(doc, &s, "handoffs", "session.handoffs")?;
        let mut handoffs = Vec::new();
        for i in 0..doc.length(&list) {
            let path = join("session.handoffs", &i.to_string());
            let h = list_map(doc, &list, i, &path)?;
            handoffs.push(read_handoff(doc, &h, &path)?);
        }
        Ok(Self {
            user,
            active_device,
            persona,
            context,
            context_at_ms,
            handoffs,
        })
    }

    /// The newest handoff still pending, if any.
    pub fn pending_handoff(&self) -> Option<&Handoff> {
        self.handoffs
            .iter()
            .rev()
            .find(|h| h.outcome == HandoffOutcome::Pending)
    }
}

fn parse_context(text: &str) -> Result<Map<String, Json>> {
    // Check the length before parsing: the parse allocates in proportion to
    // the input. serde_json's own recursion limit bounds the nesting.
    if text.len() > MAX_CONTEXT_BYTES {
        return Err(Error::schema(
            "session.context",
            format!(
                "is {} bytes, over the cap of {MAX_CONTEXT_BYTES}",
                text.len()
            ),
        ));
    }
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(_) => Err(Error::schema("session.context", "expected a JSON object")),
        Err(e) => Err(Error::schema(
            "session.context",
            format!("invalid JSON: {e}"),
        )),
    }
}

fn read_handoff<D: ReadDoc>(doc: &D, h: &ObjId, path: &str) -> Result<Handoff> {
    let outcome_path = join(path, "outcome");
    let text = req_str(doc, h, "outcome", &outcome_path)?;
    let outcome = HandoffOutcome::parse(&text)
        .ok_or_else(|| Error::schema(&outcome_path, format!("unknown outcome {text:?}")))?;
    Ok(Handoff {
        id: req_name(doc, h, "id", &join(path, "id"))?,
        from: req_name(doc, h, "from", &join(path, "from"))?,
        to: req_name(doc, h, "to", &join(path, "to"))?,
        started_at_ms: req_u64(doc, h, "started_at", &join(path, "started_at"))?,
        finished_at_ms: opt_u64(doc, h, "finished_at", &join(path, "finished_at"))?,
        outcome,
    })
}

/// Writes a new session for `user`, active on `device`, with an empty
/// context.
pub(crate) fn init<T: Transactable>(
    doc: &mut T,
    user: &str,
    device: &str,
    now_ms: u64,
) -> Result<()> {
    check_name("session.user", user)?;
    check_name("session.active_device", device)?;
    let s = doc
        .put_object(ROOT, SESSION_KEY, ObjType::Map)
        .map_err(am)?;
    doc.put(&s, "user", user).map_err(am)?;
    doc.put(&s, "active_device", device).map_err(am)?;
    doc.put(&s, "context", "{}").map_err(am)?;
    doc.put(&s, "context_at", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    doc.put_object(&s, "handoffs", ObjType::List).map_err(am)?;
    Ok(())
}

fn session_map<T: Transactable>(doc: &mut T) -> Result<ObjId> {
    req_map(doc, &ROOT, SESSION_KEY, SESSION_KEY)
}

/// Replaces the context snapshot.
pub fn set_context<T: Transactable>(
    doc: &mut T,
    context: &Map<String, Json>,
    now_ms: u64,
) -> Result<()> {
    let text = serde_json::to_string(context)
        .map_err(|e| Error::schema("session.context", e.to_string()))?;
    // Round-trip through the reader, so a snapshot this node writes is one
    // every node accepts (size cap, nesting limit).
    parse_context(&text)?;
    let s = session_map(doc)?;
    super::put_str_if_changed(doc, &s, "context", &text)?;
    doc.put(&s, "context_at", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    Ok(())
}

/// Records a prepared handoff to device `to`. Refused while another handoff
/// is pending, and for a handoff to the device that already has the session.
pub fn begin_handoff<T: Transactable>(doc: &mut T, id: &str, to: &str, now_ms: u64) -> Result<()> {
    check_name("session.handoffs.id", id)?;
    check_name("session.handoffs.to", to)?;
    let current = Session::read(doc)?;
    if let Some(p) = current.pending_handoff() {
        return Err(Error::Refused {
            what: "handoff",
            reason: format!("handoff {} to {} is still pending", p.id, p.to),
        });
    }
    if current.active_device == to {
        return Err(Error::Refused {
            what: "handoff",
            reason: format!("the session is already active on {to}"),
        });
    }
    let s = session_map(doc)?;
    let list = req_list(doc, &s, "handoffs", "session.handoffs")?;
    // Drop the oldest entries (all finished: only one can be pending) to keep
    // the history bounded.
    let len = doc.length(&list);
    for _ in 0..(len + 1).saturating_sub(MAX_HANDOFF_HISTORY) {
        doc.delete(&list, 0_usize).map_err(am)?;
    }
    let at = doc.length(&list);
    let h = doc.insert_object(&list, at, ObjType::Map).map_err(am)?;
    doc.put(&h, "id", id).map_err(am)?;
    doc.put(&h, "from", current.active_device.as_str())
        .map_err(am)?;
    doc.put(&h, "to", to).map_err(am)?;
    doc.put(&h, "started_at", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    doc.put(&h, "outcome", HandoffOutcome::Pending.as_str())
        .map_err(am)?;
    Ok(())
}

/// Finishes the pending handoff `id` with `outcome`; a completed handoff
/// moves the session to its target device.
pub fn finish_handoff<T: Transactable>(
    doc: &mut T,
    id: &str,
    outcome: HandoffOutcome,
    now_ms: u64,
) -> Result<Handoff> {
    if outcome == HandoffOutcome::Pending {
        return Err(Error::Refused {
            what: "handoff",
            reason: "a handoff finishes as completed or rolled back".into(),
        });
    }
    let current = Session::read(doc)?;
    let Some(index) = current
        .handoffs
        .iter()
        .rposition(|h| h.id == id && h.outcome == HandoffOutcome::Pending)
    else {
        return Err(Error::Refused {
            what: "handoff",
            reason: format!("no pending handoff {id}"),
        });
    };
    let s = session_map(doc)?;
    let list = req_list(doc, &s, "handoffs", "session.handoffs")?;
    let h = list_map(doc, &list, index, "session.handoffs")?;
    doc.put(&h, "outcome", outcome.as_str()).map_err(am)?;
    doc.put(&h, "finished_at", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    let mut handoff = current.handoffs[index].clone();
    if outcome == HandoffOutcome::Completed {
        super::put_str_if_changed(doc, &s, "active_device", &handoff.to)?;
    }
    handoff.outcome = outcome;
    handoff.finished_at_ms = Some(now_ms);
    Ok(handoff)
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Creates a session document for `user`, active on `device`.
    pub fn create_session(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        user: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Session, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| {
            init(doc, user, device, now_ms)
        })
    }

    /// Creates a session document for `user` with `persona`, active on `device`, holding
    /// `context` from the start: one change, so no device ever sees it half made.
    #[allow(clippy::too_many_arguments)]
    pub fn create_session_with(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        user: &str,
        persona: Option<&str>,
        device: &str,
        context: &Map<String, Json>,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        if let Some(p) = persona {
            check_name("session.persona", p)?;
        }
        let header = Header::new(DocKind::Session, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| {
            init(doc, user, device, now_ms)?;
            if let Some(p) = persona {
                let s = session_map(doc)?;
                doc.put(&s, "persona", p).map_err(am)?;
            }
            set_context(doc, context, now_ms)
        })
    }

    /// The validated session view.
    pub fn session(&self, id: DocId) -> Result<Session> {
        Session::read(self.doc(id)?)
    }

    /// Replaces the session's context snapshot.
    pub fn set_session_context(
        &mut self,
        id: DocId,
        context: &Map<String, Json>,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Session)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            set_context(doc, context, now_ms)
        })
        .map(|(_, out)| out)
    }

    /// Records a prepared handoff of the session to device `to`.
    pub fn begin_handoff(
        &mut self,
        id: DocId,
        handoff_id: &str,
        to: &str,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Session)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            begin_handoff(doc, handoff_id, to, now_ms)
        })
        .map(|(_, out)| out)
    }

    /// Completes or rolls back the pending handoff `handoff_id`.
    pub fn finish_handoff(
        &mut self,
        id: DocId,
        handoff_id: &str,
        outcome: HandoffOutcome,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<(Handoff, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Session)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            finish_handoff(doc, handoff_id, outcome, now_ms)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;
    use serde_json::json;

    fn doc() -> AutoCommit {
        let mut doc = AutoCommit::new();
        init(&mut doc, "ann", "tv", 1).unwrap();
        doc
    }

    #[test]
    fn context_and_handoffs_round_trip() {
        let mut d = doc();
        let ctx = json!({"page": "recipes", "scroll": 420})
            .as_object()
            .cloned()
            .unwrap();
        set_context(&mut d, &ctx, 5).unwrap();
        begin_handoff(&mut d, "h1", "phone", 10).unwrap();
        let err = begin_handoff(&mut d, "h2", "lamp", 11).unwrap_err();
        assert!(
            matches!(err, Error::Refused { .. }),
            "one pending at a time: {err}"
        );
        let done = finish_handoff(&mut d, "h1", HandoffOutcome::Completed, 12).unwrap();
        assert_eq!(done.to, "phone");
        begin_handoff(&mut d, "h2", "tv", 20).unwrap();
        finish_handoff(&mut d, "h2", HandoffOutcome::RolledBack, 25).unwrap();
        let s = Session::read(&d).unwrap();
        assert_eq!(s.user, "ann");
        assert_eq!(s.persona, None);
        assert_eq!(
            s.active_device, "phone",
            "a rollback leaves the session where it was"
        );
        assert_eq!(s.context, ctx);
        assert_eq!(s.context_at_ms, 5);
        assert_eq!(s.pending_handoff(), None);
        let outcomes: Vec<_> = s
            .handoffs
            .iter()
            .map(|h| (h.from.as_str(), h.to.as_str(), h.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("tv", "phone", HandoffOutcome::Completed),
                ("phone", "tv", HandoffOutcome::RolledBack)
            ]
        );
        assert_eq!(s.handoffs[1].finished_at_ms, Some(25));
    }

    #[test]
    fn handoff_refusals() {
        let mut d = doc();
        assert!(matches!(
            begin_handoff(&mut d, "h", "tv", 1),
            Err(Error::Refused { .. })
        ));
        assert!(matches!(
            finish_handoff(&mut d, "nope", HandoffOutcome::Completed, 1),
            Err(Error::Refused { .. })
        ));
        begin_handoff(&mut d, "h", "phone", 1).unwrap();
        assert!(matches!(
            finish_handoff(&mut d, "h", HandoffOutcome::Pending, 1),
            Err(Error::Refused { .. })
        ));
    }

    #[test]
    fn history_stays_bounded() {
        let mut d = doc();
        let devices = ["phone", "tv"];
        for i in 0..(MAX_HANDOFF_HISTORY + 10) {
            let id = format!("h{i}");
            begin_handoff(&mut d, &id, devices[i % 2], i as u64).unwrap();
            finish_handoff(&mut d, &id, HandoffOutcome::Completed, i as u64).unwrap();
        }
        let s = Session::read(&d).unwrap();
        assert_eq!(s.handoffs.len(), MAX_HANDOFF_HISTORY);
        assert_eq!(
            s.handoffs.last().unwrap().id,
            format!("h{}", MAX_HANDOFF_HISTORY + 9)
        );
    }

    #[test]
    fn oversized_context_is_refused_on_write() {
        let mut d = doc();
        let big = json!({"blob": "x".repeat(MAX_CONTEXT_BYTES)})
            .as_object()
            .cloned()
            .unwrap();
        assert!(
            matches!(set_context(&mut d, &big, 1), Err(Error::Schema { path, .. }) if path == "session.context")
        );
    }

    #[test]
    fn malformed_sessions_from_a_peer_name_the_field() {
        let mut base = doc();
        begin_handoff(&mut base, "h1", "phone", 2).unwrap();
        let s_of = |d: &AutoCommit| d.get(ROOT, SESSION_KEY).unwrap().unwrap().1;
        let check = |d: &AutoCommit, want: &str| {
            assert!(
                matches!(Session::read(d), Err(Error::Schema { ref path, .. }) if path == want),
                "{want}: {:?}",
                Session::read(d)
            );
        };
        let mut d = base.clone();
        let s = s_of(&d);
        d.put(&s, "context", "[1, 2]").unwrap();
        check(&d, "session.context");
        d.put(&s, "context", "{not json").unwrap();
        check(&d, "session.context");
        d.put(&s, "context", "x".repeat(MAX_CONTEXT_BYTES + 1))
            .unwrap();
        check(&d, "session.context");
        let mut d = base.clone();
        let s = s_of(&d);
        d.put(&s, "persona", 7_i64).unwrap();
        check(&d, "session.persona");
        d.put(&s, "persona", "").unwrap();
        check(&d, "session.persona");
        let mut d = base.clone();
        let s = s_of(&d);
        d.put(&s, "active_device", ScalarValue::Boolean(true))
            .unwrap();
        check(&d, "session.active_device");
        let mut d = base.clone();
        let s = s_of(&d);
        let (_, list) = d.get(&s, "handoffs").unwrap().unwrap();
        let (_, h) = d.get(&list, 0_usize).unwrap().unwrap();
        d.put(&h, "outcome", "lost").unwrap();
        check(&d, "session.handoffs.0.outcome");
        d.put(&h, "outcome", "pending").unwrap();
        d.put(&h, "finished_at", -4_i64).unwrap();
        check(&d, "session.handoffs.0.finished_at");
        d.delete(&h, "finished_at").unwrap();
        d.insert(&list, 1_usize, "oops").unwrap();
        check(&d, "session.handoffs.1");
    }
}
