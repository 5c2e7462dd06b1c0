//! One sync session per (peer, document), wrapping `automerge::sync::State`.

use automerge::ChangeHash;
use automerge::sync::State;

/// Catch-up bookkeeping for one peer and one document.
///
/// Only `shared_heads` survive [`SyncSession::encode`]; that is all Automerge
/// persists, and it is enough for a reconnect to resume from the last common
/// point instead of starting from an empty bloom filter.
#[derive(Debug)]
pub(crate) struct SyncSession {
    pub(crate) state: State,
    /// The peer had our heads at the last exchange, so a direct push will find
    /// its dependencies there.
    pub(crate) in_sync: bool,
    /// We sent a message that calls for an answer at this time. Lost messages
    /// would otherwise stall Automerge's protocol, which waits for a reply
    /// forever while a message is in flight.
    pub(crate) awaiting_since: Option<u64>,
    /// A confirmation round is due: pushes were sent (or changes relayed) and
    /// one sync exchange will prove the peer has them.
    pub(crate) confirm_at: Option<u64>,
    /// The session was reset and must send an opening message.
    pub(crate) kick_at: Option<u64>,
    /// `shared_heads` at the last time the state was handed out for storage.
    pub(crate) persisted_shared: Vec<ChangeHash>,
    /// The deadline this session holds in the engine's timer set, so the entry can be
    /// found and moved when the deadline changes.
    pub(crate) scheduled: Option<u64>,
    /// Exchanges restarted in a row because their answer was overdue. Each doubles the
    /// wait before the next restart (up to [`MAX_RETRY_DOUBLINGS`]): a peer that is slow
    /// rather than gone, with our earlier messages still queued toward it, is not sent
    /// a fresh exchange every few seconds on top of them, which would slow it further.
    pub(crate) unanswered: u32,
}

/// Most times the overdue wait doubles: 3 s becomes at most 48 s.
pub(crate) const MAX_RETRY_DOUBLINGS: u32 = 4;

impl SyncSession {
    pub(crate) fn new() -> Self {
        Self {
            state: State::new(),
            in_sync: false,
            awaiting_since: None,
            confirm_at: None,
            kick_at: None,
            persisted_shared: Vec::new(),
            scheduled: None,
            unanswered: 0,
        }
    }

    /// Resumes from bytes produced by [`SyncSession::encode`].
    pub(crate) fn resume(bytes: &[u8]) -> Result<Self, String> {
        let state = State::decode(bytes).map_err(|e| e.to_string())?;
        // Automerge asserts that hash lists it re-encodes are sorted; a
        // corrupted store must not reach that assertion.
        if !state.shared_heads.windows(2).all(|w| w[0] < w[1]) {
            return Err("shared heads are not sorted and unique".into());
        }
        let persisted_shared = state.shared_heads.clone();
        Ok(Self {
            state,
            persisted_shared,
            ..Self::new()
        })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        self.state.encode()
    }

    /// Forgets everything, including shared heads: used after malformed input,
    /// when nothing learnt from this peer can be trusted.
    pub(crate) fn reset(&mut self, now_ms: u64) {
        // The timer entry outlives the reset; the engine moves it afterwards.
        let scheduled = self.scheduled;
        *self = Self::new();
        self.scheduled = scheduled;
        self.kick_at = Some(now_ms);
    }

    /// Keeps shared heads but drops in-flight bookkeeping, as a reconnect
    /// would. Used when an answer is overdue.
    pub(crate) fn restart(&mut self) {
        let shared = std::mem::take(&mut self.state.shared_heads);
        self.state = State::new();
        self.state.shared_heads = shared;
        self.awaiting_since = None;
    }

    /// How long an answer may take before the exchange restarts: `retry_after_ms`,
    /// doubled for each restart in a row.
    pub(crate) fn retry_delay(&self, retry_after_ms: u64) -> u64 {
        retry_after_ms.saturating_mul(1 << self.unanswered.min(MAX_RETRY_DOUBLINGS))
    }

    /// Earliest time at which `tick` has work for this session.
    pub(crate) fn deadline(&self, retry_after_ms: u64) -> Option<u64> {
        let delay = self.retry_delay(retry_after_ms);
        let retry = self.awaiting_since.map(|t| t.saturating_add(delay));
        [self.confirm_at, self.kick_at, retry]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_keeps_shared_heads_and_rejects_garbage() {
        let mut s = SyncSession::new();
        let h = ChangeHash([7; 32]);
        s.state.shared_heads = vec![h];
        let back = SyncSession::resume(&s.encode()).unwrap();
        assert_eq!(back.state.shared_heads, vec![h]);
        assert!(!back.in_sync);
        assert!(SyncSession::resume(&[0xff, 1, 2]).is_err());
        assert!(SyncSession::resume(&[]).is_err());
        // Encoding unsorted heads trips Automerge's debug assertion, so build
        // the bytes by hand: type byte, count, then the hashes.
        let mut bytes = vec![0x43, 2];
        bytes.extend([9u8; 32]);
        bytes.extend([1u8; 32]);
        assert!(SyncSession::resume(&bytes).is_err());
        bytes[2..34].copy_from_slice(&[0; 32]);
        assert!(SyncSession::resume(&bytes).is_ok(), "sorted heads resume");
    }

    #[test]
    fn restart_keeps_shared_heads_and_reset_does_not() {
        let mut s = SyncSession::new();
        s.state.shared_heads = vec![ChangeHash([1; 32])];
        s.awaiting_since = Some(5);
        s.restart();
        assert_eq!(s.state.shared_heads.len(), 1);
        assert_eq!(s.awaiting_since, None);
        s.reset(9);
        assert!(s.state.shared_heads.is_empty());
        assert_eq!(s.deadline(100), Some(9));
    }

    #[test]
    fn the_wait_for_an_overdue_answer_doubles_with_each_restart_in_a_row() {
        let mut s = SyncSession::new();
        s.awaiting_since = Some(1_000);
        assert_eq!(s.deadline(3_000), Some(4_000));
        s.unanswered = 1;
        assert_eq!(s.deadline(3_000), Some(7_000));
        s.unanswered = 40;
        assert_eq!(s.retry_delay(3_000), 48_000, "capped");
    }
}
