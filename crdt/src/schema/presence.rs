//! Typed view of a `presence` document (one per home, and one per room): who
//! is around, on which device, since when.
//!
//! Layout under the root key `presence`: `users.<user>` = map { `status`:
//! "online" | "away" | "busy", `device`: string, `since`: uint ms, `note`:
//! optional string }.
//!
//! `offline` is never stored. It is derived from liveness (heartbeats on the
//! ephemeral channel), because a device that goes away without a word cannot
//! write that it left; a stored `offline` would only ever be stale. A peer
//! that writes one anyway gets a schema error naming the field.

use std::collections::BTreeMap;
use std::fmt::Debug;

use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc, ScalarValue};

use super::fields::{MAX_NOTE_BYTES, check_name, check_text, req_name};
use super::room::expect_kind;
use super::{DocKind, Header, am, ensure_map, join, keys, opt_str, req_map, req_str, req_u64};
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::ids::{DocId, KeyEpoch};

/// Root key of the presence map.
pub const PRESENCE_KEY: &str = "presence";

/// A status a user can set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceStatus {
    /// Available.
    Online,
    /// Away from the device.
    Away,
    /// Present but not to be disturbed.
    Busy,
}

impl PresenceStatus {
    /// Stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Away => "away",
            PresenceStatus::Busy => "busy",
        }
    }

    /// Inverse of [`PresenceStatus::as_str`]. `offline` is not a status one
    /// can set, so it parses to `None` like any unknown text.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "online" => PresenceStatus::Online,
            "away" => PresenceStatus::Away,
            "busy" => PresenceStatus::Busy,
            _ => return None,
        })
    }
}

/// One user's presence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEntry {
    /// Status.
    pub status: PresenceStatus,
    /// Device the user is on.
    pub device: String,
    /// When the status last changed, ms since the Unix epoch.
    pub since_ms: u64,
    /// Optional free text.
    pub note: Option<String>,
}

/// A presence write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceUpdate {
    /// New status.
    pub status: PresenceStatus,
    /// Device the user is on.
    pub device: String,
    /// Note; `None` clears it.
    pub note: Option<String>,
}

/// The presence document, after validation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Presence {
    /// Entries by user.
    pub users: BTreeMap<String, PresenceEntry>,
}

impl Presence {
    /// Reads and validates the presence view of `doc`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let p = req_map(doc, &ROOT, PRESENCE_KEY, PRESENCE_KEY)?;
        let u = req_map(doc, &p, "users", "presence.users")?;
        let mut users = BTreeMap::new();
        for user in keys(doc, &u) {
            let path = join("presence.users", &user);
            check_name(&path, &user)?;
            let e = req_map(doc, &u, &user, &path)?;
            let status_path = join(&path, "status");
            let text = req_str(doc, &e, "status", &status_path)?;
            let status = PresenceStatus::parse(&text).ok_or_else(|| {
                let reason = if text == "offline" {
                    "offline is derived from liveness and never stored".to_string()
                } else {
                    format!("unknown status {text:?}")
                };
                Error::schema(&status_path, reason)
            })?;
            let device = req_name(doc, &e, "device", &join(&path, "device"))?;
            let since_ms = req_u64(doc, &e, "since", &join(&path, "since"))?;
            let note_path = join(&path, "note");
            let note = opt_str(doc, &e, "note", &note_path)?;
            if let Some(n) = &note {
                check_text(&note_path, n, MAX_NOTE_BYTES)?;
            }
            users.insert(
                user,
                PresenceEntry {
                    status,
                    device,
                    since_ms,
                    note,
                },
            );
        }
        Ok(Self { users })
    }
}

/// Creates the empty presence layout.
pub(crate) fn init<T: Transactable>(doc: &mut T) -> Result<()> {
    let p = ensure_map(doc, &ROOT, PRESENCE_KEY)?;
    ensure_map(doc, &p, "users")?;
    Ok(())
}

/// Sets `user`'s presence. `since` moves to `now_ms` only when the status
/// changes, so a device re-announcing itself does not reset it.
pub fn set_presence<T: Transactable>(
    doc: &mut T,
    user: &str,
    update: &PresenceUpdate,
    now_ms: u64,
) -> Result<PresenceEntry> {
    let path = join("presence.users", user);
    check_name(&path, user)?;
    check_name(&join(&path, "device"), &update.device)?;
    if let Some(n) = &update.note {
        check_text(&join(&path, "note"), n, MAX_NOTE_BYTES)?;
    }
    let p = ensure_map(doc, &ROOT, PRESENCE_KEY)?;
    let u = ensure_map(doc, &p, "users")?;
    let previous = match doc.get(&u, user).map_err(am)? {
        Some((automerge::Value::Object(automerge::ObjType::Map), e)) => {
            let status = req_str(doc, &e, "status", &path)
                .ok()
                .and_then(|s| PresenceStatus::parse(&s));
            let since = req_u64(doc, &e, "since", &path).ok();
            Some((e, status, since))
        }
        _ => None,
    };
    let (e, since_ms) = match previous {
        Some((e, Some(status), Some(since))) if status == update.status => (e, since),
        Some((e, _, _)) => (e, now_ms),
        None => (ensure_map(doc, &u, user)?, now_ms),
    };
    super::put_str_if_changed(doc, &e, "status", update.status.as_str())?;
    super::put_str_if_changed(doc, &e, "device", &update.device)?;
    if req_u64(doc, &e, "since", &path).ok() != Some(since_ms) {
        doc.put(&e, "since", ScalarValue::Uint(since_ms))
            .map_err(am)?;
    }
    match &update.note {
        Some(n) => super::put_str_if_changed(doc, &e, "note", n)?,
        None => {
            if doc.get(&e, "note").map_err(am)?.is_some() {
                doc.delete(&e, "note").map_err(am)?;
            }
        }
    }
    Ok(PresenceEntry {
        status: update.status,
        device: update.device.clone(),
        since_ms,
        note: update.note.clone(),
    })
}

/// Removes `user`'s entry. Returns false when there was none.
pub fn remove_presence<T: Transactable>(doc: &mut T, user: &str) -> Result<bool> {
    let p = ensure_map(doc, &ROOT, PRESENCE_KEY)?;
    let u = ensure_map(doc, &p, "users")?;
    if doc.get(&u, user).map_err(am)?.is_none() {
        return Ok(false);
    }
    doc.delete(&u, user).map_err(am)?;
    Ok(true)
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Creates an empty presence document owned by `owner_home`.
    pub fn create_presence(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Presence, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| init(doc))
    }

    /// The validated presence view.
    pub fn presence(&self, id: DocId) -> Result<Presence> {
        Presence::read(self.doc(id)?)
    }

    /// Sets `user`'s presence and returns the entry as written.
    pub fn set_presence(
        &mut self,
        id: DocId,
        user: &str,
        update: &PresenceUpdate,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<(PresenceEntry, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Presence)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            set_presence(doc, user, update, now_ms)
        })
    }

    /// Removes `user`'s presence entry.
    pub fn remove_presence(
        &mut self,
        id: DocId,
        user: &str,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Presence)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            remove_presence(doc, user)
        })
        .map(|(_, out)| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;

    fn update(status: PresenceStatus, note: Option<&str>) -> PresenceUpdate {
        PresenceUpdate {
            status,
            device: "phone".into(),
            note: note.map(str::to_string),
        }
    }

    fn doc() -> AutoCommit {
        let mut doc = AutoCommit::new();
        init(&mut doc).unwrap();
        doc
    }

    #[test]
    fn since_moves_only_when_the_status_changes() {
        let mut d = doc();
        let e = set_presence(&mut d, "ann", &update(PresenceStatus::Online, None), 10).unwrap();
        assert_eq!(e.since_ms, 10);
        set_presence(
            &mut d,
            "ann",
            &update(PresenceStatus::Online, Some("lunch")),
            20,
        )
        .unwrap();
        let p = Presence::read(&d).unwrap();
        assert_eq!(p.users["ann"].since_ms, 10);
        assert_eq!(p.users["ann"].note.as_deref(), Some("lunch"));
        set_presence(&mut d, "ann", &update(PresenceStatus::Busy, None), 30).unwrap();
        let p = Presence::read(&d).unwrap();
        assert_eq!(
            p.users["ann"],
            PresenceEntry {
                status: PresenceStatus::Busy,
                device: "phone".into(),
                since_ms: 30,
                note: None,
            }
        );
        assert!(remove_presence(&mut d, "ann").unwrap());
        assert!(!remove_presence(&mut d, "ann").unwrap());
        assert!(Presence::read(&d).unwrap().users.is_empty());
    }

    #[test]
    fn offline_and_bad_fields_from_a_peer_name_the_path() {
        let mut d = doc();
        set_presence(
            &mut d,
            "ann",
            &update(PresenceStatus::Away, Some("back soon")),
            1,
        )
        .unwrap();
        let (_, p) = d.get(ROOT, PRESENCE_KEY).unwrap().unwrap();
        let (_, u) = d.get(&p, "users").unwrap().unwrap();
        let (_, e) = d.get(&u, "ann").unwrap().unwrap();
        let check = |d: &AutoCommit, want: &str, reason_part: &str| match Presence::read(d) {
            Err(Error::Schema { path, reason }) => {
                assert_eq!(path, want);
                assert!(reason.contains(reason_part), "{reason}");
            }
            other => panic!("{other:?}"),
        };
        d.put(&e, "status", "offline").unwrap();
        check(&d, "presence.users.ann.status", "derived");
        d.put(&e, "status", "asleep").unwrap();
        check(&d, "presence.users.ann.status", "unknown");
        d.put(&e, "status", "away").unwrap();
        d.put(&e, "since", "yesterday").unwrap();
        check(&d, "presence.users.ann.since", "unsigned");
        d.put(&e, "since", 5_u64).unwrap();
        d.put(&e, "note", "x".repeat(MAX_NOTE_BYTES + 1)).unwrap();
        check(&d, "presence.users.ann.note", "cap");
        d.delete(&e, "note").unwrap();
        d.delete(&e, "device").unwrap();
        check(&d, "presence.users.ann.device", "missing");
        d.put(&u, "bob", 1_i64).unwrap();
        d.put(&e, "device", "phone").unwrap();
        check(&d, "presence.users.bob", "map");
    }

    #[test]
    fn writes_refuse_bad_input() {
        let mut d = doc();
        let bad_device = PresenceUpdate {
            status: PresenceStatus::Online,
            device: String::new(),
            note: None,
        };
        assert!(matches!(
            set_presence(&mut d, "ann", &bad_device, 1),
            Err(Error::Schema { path, .. }) if path == "presence.users.ann.device"
        ));
        assert!(set_presence(&mut d, "", &update(PresenceStatus::Online, None), 1).is_err());
        assert_eq!(PresenceStatus::parse("offline"), None);
    }
}
