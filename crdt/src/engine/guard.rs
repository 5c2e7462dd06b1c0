//! Checks on peer input before and after Automerge sees it: payload caps and actors,
//! sync message sanity, and schema validation of what landed.

use std::collections::BTreeSet;

use automerge::sync::Message;
use automerge::{ActorId, AutoCommit, Change, ChangeHash};

use crate::chunks::{Limits, Refusal, Scanner};
use crate::error::{Error, Result};
use crate::hlc::HlcClock;
use crate::ids::DocId;
use crate::schema::entity::Entity;
use crate::schema::home;
use crate::schema::registry::{self, Registry};
use crate::schema::touched::Touched;
use crate::schema::{DocKind, Header};
use crate::wire::Frame;

use super::{DocState, EngineConfig, EngineStats, catch, touched_by};

/// Lists the actors that wrote the changes in a push or sync payload, so the
/// node can refuse writes from devices of unauthorised homes before handing
/// the frame to [`Engine::receive`](super::Engine::receive). For a sync message this is every change
/// it carries, including ones the receiver may already have. Payloads are
/// capped as the engine caps them.
pub fn payload_actors(frame: &Frame, config: &EngineConfig) -> Result<BTreeSet<ActorId>> {
    match frame {
        Frame::Push(p) => {
            if p.bytes.len() > config.max_push_bytes {
                return Err(Error::TooLarge {
                    what: "push",
                    len: p.bytes.len(),
                    cap: config.max_push_bytes,
                });
            }
            let limits = frame_limits(config, false);
            let changes = catch(|| {
                let mut scanner = Scanner::new(limits);
                scanner.scan(&p.bytes).map(|()| scanner.changes)
            })
            .map_err(|()| Error::Panicked {
                doc: p.doc,
                during: "parsing a push",
            })?
            .map_err(|refusal| refused(None, p.doc, Payload::Push, refusal))?;
            Ok(changes.iter().map(|c| c.actor_id().clone()).collect())
        }
        Frame::Sync(s) => {
            if s.bytes.len() > config.max_sync_message_bytes {
                return Err(Error::TooLarge {
                    what: "sync message",
                    len: s.bytes.len(),
                    cap: config.max_sync_message_bytes,
                });
            }
            let doc = s.doc;
            let panicked = |()| Error::Panicked {
                doc,
                during: "listing sync message actors",
            };
            let msg = catch(|| Message::decode(&s.bytes))
                .map_err(panicked)?
                .map_err(|e| Error::Sync {
                    doc,
                    reason: format!("undecodable message: {e}"),
                })?;
            // Walked and capped as the engine walks them, so nothing below
            // inflates a compressed chunk, or a document past the cap.
            let limits = frame_limits(config, true);
            let mut scanner = Scanner::new(limits);
            for entry in msg.changes.iter() {
                catch(|| scanner.scan(entry))
                    .map_err(panicked)?
                    .map_err(|refusal| refused(None, doc, Payload::Sync, refusal))?;
            }
            let mut actors: BTreeSet<ActorId> = scanner
                .changes
                .iter()
                .map(|c| c.actor_id().clone())
                .collect();
            // A whole document (v2 messages send one when the peer is far
            // behind): load it to see its authors. Its inflated size was
            // counted against the cap above.
            for chunk in &scanner.documents {
                let mut whole = catch(|| AutoCommit::load(chunk))
                    .map_err(panicked)?
                    .map_err(|e| Error::Sync {
                        doc,
                        reason: format!("undecodable document chunk: {e}"),
                    })?;
                let metas = catch(|| {
                    whole
                        .get_changes_meta(&[])
                        .into_iter()
                        .map(|m| m.actor.into_owned())
                        .collect::<Vec<_>>()
                })
                .map_err(panicked)?;
                actors.extend(metas);
            }
            Ok(actors)
        }
        Frame::Digest(_) | Frame::Grant(_) => Ok(BTreeSet::new()),
    }
}

/// Which kind of payload a refusal concerns.
#[derive(Clone, Copy)]
pub(super) enum Payload {
    Push,
    Sync,
}

/// The caps on one push (changes only) or sync message (documents too).
pub(crate) fn frame_limits(config: &EngineConfig, documents: bool) -> Limits {
    Limits {
        max_changes: if documents {
            usize::MAX
        } else {
            config.max_changes_per_push
        },
        max_decoded: config.max_decoded_frame_bytes,
        max_ops: config.max_ops_per_frame,
        documents,
    }
}

/// The error for a payload the chunk walk refused, counted in `stats` when
/// the engine (rather than [`payload_actors`]) refused it.
pub(super) fn refused(
    stats: Option<&mut EngineStats>,
    doc: DocId,
    payload: Payload,
    refusal: Refusal,
) -> Error {
    let (push, name) = match payload {
        Payload::Push => (true, "push"),
        Payload::Sync => (false, "sync message"),
    };
    match refusal {
        Refusal::Compressed(chunk_type) => {
            if let Some(stats) = stats {
                stats.compressed_refused += 1;
            }
            Error::Compressed {
                doc,
                what: name,
                chunk_type,
            }
        }
        Refusal::TooLarge { what, len, cap } => {
            if let Some(stats) = stats {
                stats.oversized += 1;
            }
            let what = match (what, push) {
                ("changes", _) => "changes in a push",
                ("ops", true) => "ops in a push",
                ("ops", false) => "ops in a sync message",
                (_, true) => "push once decoded",
                (_, false) => "sync message once decoded",
            };
            Error::TooLarge { what, len, cap }
        }
        Refusal::Malformed(reason) if push => Error::Changes { doc, reason },
        Refusal::Malformed(reason) => Error::Sync { doc, reason },
    }
}

/// Largest bloom-filter probe count accepted from a peer. Automerge writes 7;
/// it allocates a vector of `num_probes` entries for every hash it tests, so an
/// unchecked `u32::MAX` from a peer is a 16 GiB allocation (an abort, which no
/// `catch_unwind` can contain).
const MAX_BLOOM_PROBES: u64 = 64;
/// Largest bits-per-entry accepted from a peer (Automerge writes 10).
const MAX_BLOOM_BITS_PER_ENTRY: u64 = 64;

/// Refuses messages Automerge would mishandle: unsorted hash lists, and bloom
/// filters that would make it divide by zero (an empty bit array with a
/// non-zero entry count) or allocate without bound. Found by the `receive`
/// fuzz target and the arbitrary-payload proptest.
pub(super) fn check_blooms(msg: &Message) -> std::result::Result<(), String> {
    // Automerge keeps hash lists sorted and asserts it when re-encoding them
    // (e.g. a peer's heads become our persisted shared heads).
    let sorted = |h: &[ChangeHash]| h.windows(2).all(|w| w[0] < w[1]);
    if !sorted(&msg.heads) || !sorted(&msg.need) || !msg.have.iter().all(|h| sorted(&h.last_sync)) {
        return Err("hash lists in the message are not sorted and unique".into());
    }
    for have in &msg.have {
        let bytes = have.bloom.to_bytes();
        if bytes.is_empty() {
            continue;
        }
        let mut rest = bytes.as_slice();
        let mut fields = [0u64; 3];
        for f in &mut fields {
            let (v, used) = crate::chunks::read_uleb(rest)?;
            *f = v;
            rest = &rest[used..];
        }
        let [_, bits_per_entry, probes] = fields;
        if rest.is_empty() || bits_per_entry == 0 || bits_per_entry > MAX_BLOOM_BITS_PER_ENTRY {
            return Err(format!(
                "bloom filter with {} bytes of bits at {bits_per_entry} bits per entry",
                rest.len()
            ));
        }
        if probes == 0 || probes > MAX_BLOOM_PROBES {
            return Err(format!("bloom filter with {probes} probes"));
        }
    }
    Ok(())
}

/// Refuses changes in `check` that mention an actor the document has not
/// seen and that no first change (`seq == 1`) in `batch` introduces.
pub(crate) fn check_actors(
    check: &[Change],
    batch: &[Change],
    known: &BTreeSet<ActorId>,
) -> std::result::Result<(), String> {
    let introduced: BTreeSet<&ActorId> = batch
        .iter()
        .filter(|c| c.seq() == 1)
        .map(|c| c.actor_id())
        .collect();
    for c in check {
        if let Some(a) = c
            .actors()
            .find(|a| !known.contains(*a) && !introduced.contains(a))
        {
            return Err(format!(
                "change {} mentions actor {a}, which this document has not seen",
                c.hash()
            ));
        }
    }
    Ok(())
}

/// [`check_actors`] for the changes of a sync message that Automerge would
/// apply now: those whose dependencies are all in the document or the message.
/// The rest wait in Automerge's queue for their dependencies.
pub(super) fn check_sync_actors(
    doc: &mut AutoCommit,
    changes: &[Change],
    known: &BTreeSet<ActorId>,
) -> std::result::Result<(), String> {
    if changes.is_empty() {
        return Ok(());
    }
    let in_msg: BTreeSet<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
    let ready: Vec<Change> = changes
        .iter()
        .filter(|c| {
            c.deps()
                .iter()
                .all(|d| in_msg.contains(d) || doc.get_change_meta_by_hash(d).is_some())
        })
        .cloned()
        .collect();
    check_actors(&ready, changes, known)
}

/// Re-reads the header and validates the view for the document's kind. An
/// entity's HLC is folded into the clock so later local writes sort after it.
/// `fresh` holds the changes just applied; for a home or registry document that
/// validated before, only the collection entries they (and local writes since) touched
/// are read, which is the same check at a cost that does not grow with the home.
pub(super) fn validate<P>(
    ds: &mut DocState<P>,
    clock: &mut HlcClock,
    now_ms: u64,
    fresh: &[u8],
) -> Result<()> {
    let since_valid = ds.unchecked.take();
    let result = check_view(ds, clock, now_ms, fresh, since_valid);
    ds.unchecked = match &result {
        Ok(kind) => Some((*kind, Touched::default())),
        Err(_) => None,
    };
    result.map(|_| ())
}

fn check_view<P>(
    ds: &mut DocState<P>,
    clock: &mut HlcClock,
    now_ms: u64,
    fresh: &[u8],
    since_valid: Option<(DocKind, Touched)>,
) -> Result<DocKind> {
    let header = Header::read(&ds.doc)?;
    let kind = header.kind;
    ds.header = header;
    let touched = |path: &[&str]| match since_valid {
        Some((was, mut touched)) if was == kind && touched != Touched::Everything => {
            touched.merge(touched_by(&ds.doc, fresh, path));
            touched
        }
        _ => Touched::Everything,
    };
    match kind {
        DocKind::Entity => {
            let e = Entity::read(&ds.doc)?;
            crate::policy::read_policy(&ds.doc)?;
            // A reading beyond the drift bound is kept in the document (it is
            // the writer's claim) but does not drag our clock forward.
            let _ = clock.observe(&e.updated_at, now_ms);
        }
        DocKind::Registry => {
            let touched = touched(&registry::ENTITIES_PATH);
            Registry::read_entries(&ds.doc, &touched)?;
        }
        DocKind::Home => {
            let touched = touched(&home::KEYRING_PATH);
            home::validate_touched(&ds.doc, &touched)?;
        }
        DocKind::Room => match crate::chunks::parse_changes(fresh, usize::MAX) {
            Ok(changes) => crate::schema::room::check_after(&ds.doc, &changes)?,
            Err(_) => {
                crate::schema::room::Room::read(&ds.doc)?;
            }
        },
        DocKind::Presence => {
            crate::schema::presence::Presence::read(&ds.doc)?;
        }
        DocKind::Locks => {
            crate::schema::locks::Locks::read(&ds.doc)?;
        }
        DocKind::Session => {
            crate::schema::session::Session::read(&ds.doc)?;
        }
        DocKind::Users => {
            // Items that do not validate are left out when read, never fatal (see
            // `Users::read`): only the layout's root must be there.
            crate::schema::users::check_root(&ds.doc)?;
        }
        DocKind::Activity => {
            crate::schema::activity::Activity::read(&ds.doc)?;
        }
    }
    Ok(kind)
}
