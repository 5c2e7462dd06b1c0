//! The `/hearth/pair/1` transport: short request-response rounds that carry the pairing
//! exchange, open to peers that have not been admitted yet.
//!
//! The bytes are opaque here (the node layer runs the PAKE); this module holds the wire
//! messages, the limits, the per-peer rate limiter and the deadline arithmetic the event
//! loop applies. Everything is plain data so it can be tested without sockets.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::io::Cursor;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::request_response::{self, cbor};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use crate::event::{Counters, bump};

/// Protocol of the pairing exchange; the only one a non-admitted peer may use besides
/// hello.
pub const PAIR_PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/pair/1");

/// Largest pairing message, request or response. Pairing messages are a few KiB of CBOR;
/// the cap keeps an unauthenticated peer from making this node buffer more.
pub const MAX_PAIR_MESSAGE_SIZE: usize = 64 * 1024;

/// How long one pairing request may wait for its response once sent.
pub const PAIR_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`crate::Handle::pair_request`] waits for a connection to the peer when it
/// had to dial.
pub const PAIR_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pairing requests a peer may send back to back before the rate limit applies. A whole
/// exchange takes two or three, so this leaves room for one retry.
pub const PAIR_RATE_BURST: u32 = 5;

/// Once its burst is spent, a peer regains one pairing request per interval.
pub const PAIR_RATE_INTERVAL: Duration = Duration::from_secs(1);

/// Most peers in a pairing exchange at once. Each of them holds buffers and, when not
/// admitted, a connection slot for up to [`crate::Config::pairing_max_duration`].
pub const MAX_PAIRING_PEERS: usize = 16;

/// Inbound pairing requests waiting for the node's [`crate::Handle::pair_respond`].
pub(crate) const MAX_PENDING_PAIR_RESPONSES: usize = 64;

/// Outbound pairing requests (sent or waiting for a connection) at once.
pub(crate) const MAX_PENDING_PAIR_REQUESTS: usize = 64;

/// Concurrent pairing streams per connection. The codec buffers up to a whole message
/// per stream before the rate limiter sees it, so this bounds memory per connection.
pub(crate) const PAIR_MAX_CONCURRENT_STREAMS: usize = 4;

/// A peer counts as pairing for this long after its last pairing message.
pub(crate) const PAIR_ACTIVE_WINDOW: Duration = PAIR_REQUEST_TIMEOUT;

/// Most rate-limiter entries kept. Entries outlive sessions, so reconnecting does not
/// reset a peer's budget; full (idle) buckets are pruned.
pub(crate) const MAX_PAIR_RATE_ENTRIES: usize = 256;

/// Longest refusal reason taken from a peer's response; the rest is cut.
pub(crate) const MAX_REFUSAL_REASON: usize = 200;

/// CBOR framing around the payload costs a few bytes; leave room for them.
pub(crate) const PAIR_WIRE_MAX: u64 = MAX_PAIR_MESSAGE_SIZE as u64 + 1024;

/// The request on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PairRequestMsg {
    /// A CBOR byte string rather than serde's default array of integers.
    #[serde(with = "serde_bytes")]
    pub(crate) bytes: Vec<u8>,
}

/// The response on the wire: the node's answer, or a refusal by this layer (rate limit,
/// capacity, a peer on its way out) that never reached the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum PairResponseMsg {
    Reply(#[serde(with = "serde_bytes")] Vec<u8>),
    Refused(String),
}

/// Identifies an inbound pairing request until it is answered with
/// [`crate::Handle::pair_respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairRequestId(pub(crate) u64);

impl fmt::Display for PairRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pair-{}", self.0)
    }
}

/// The pairing codec: libp2p's CBOR codec behind a hard cap, counting what it cannot read.
///
/// libp2p's request-response drops an inbound stream whose request fails to decode
/// without telling the behaviour, so the count has to be taken here; and the inner
/// codec silently truncates at its limit, so an oversized message is recognised first
/// and named as such.
#[derive(Clone)]
pub(crate) struct PairCodec {
    inner: cbor::codec::Codec<PairRequestMsg, PairResponseMsg>,
    counters: Arc<Counters>,
}

impl PairCodec {
    pub(crate) fn new(counters: Arc<Counters>) -> Self {
        Self {
            inner: cbor::codec::Codec::default()
                .set_request_size_maximum(PAIR_WIRE_MAX)
                .set_response_size_maximum(PAIR_WIRE_MAX),
            counters,
        }
    }
}

/// Reads a whole message (the sender closes its side after one), refusing to buffer more
/// than [`PAIR_WIRE_MAX`] bytes.
async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Cursor<Vec<u8>>> {
    let mut buf = Vec::new();
    io.take(PAIR_WIRE_MAX + 1).read_to_end(&mut buf).await?;
    if buf.len() as u64 > PAIR_WIRE_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("pairing message over the {PAIR_WIRE_MAX}-byte wire limit"),
        ));
    }
    Ok(Cursor::new(buf))
}

fn payload_too_large(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("pairing message of {len} bytes exceeds the {MAX_PAIR_MESSAGE_SIZE}-byte limit"),
    )
}

impl request_response::Codec for PairCodec {
    type Protocol = StreamProtocol;
    type Request = PairRequestMsg;
    type Response = PairResponseMsg;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<PairRequestMsg>
    where
        T: AsyncRead + Unpin + Send,
    {
        let result = match read_capped(io).await {
            Ok(mut whole) => match self.inner.read_request(protocol, &mut whole).await {
                Ok(request) if request.bytes.len() > MAX_PAIR_MESSAGE_SIZE => {
                    Err(payload_too_large(request.bytes.len()))
                }
                other => other,
            },
            Err(error) => Err(error),
        };
        if let Err(error) = &result {
            bump(&self.counters.pair_requests_malformed, 1);
            tracing::debug!(%error, "unreadable pairing request; closing its stream");
        }
        result
    }

    async fn read_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<PairResponseMsg>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut whole = read_capped(io).await?;
        match self.inner.read_response(protocol, &mut whole).await? {
            PairResponseMsg::Reply(bytes) if bytes.len() > MAX_PAIR_MESSAGE_SIZE => {
                Err(payload_too_large(bytes.len()))
            }
            response => Ok(response),
        }
    }

    async fn write_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        request: PairRequestMsg,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.inner.write_request(protocol, io, request).await
    }

    async fn write_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        response: PairResponseMsg,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.inner.write_response(protocol, io, response).await
    }
}

/// A token bucket: [`PAIR_RATE_BURST`] requests at once, then one per
/// [`PAIR_RATE_INTERVAL`].
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: u32,
    /// When the last token was credited; refills count whole intervals from here.
    refilled: Instant,
}

impl TokenBucket {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            tokens: PAIR_RATE_BURST,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed.as_nanos() / PAIR_RATE_INTERVAL.as_nanos();
        if earned == 0 {
            return;
        }
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(PAIR_RATE_BURST);
        // Advance by whole intervals only, so partial progress toward the next token is
        // kept; a full bucket restarts the clock.
        self.refilled = if self.tokens == PAIR_RATE_BURST {
            now
        } else {
            self.refilled + PAIR_RATE_INTERVAL * earned
        };
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Whether the bucket is back to its full burst, so forgetting it changes nothing.
    pub(crate) fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens == PAIR_RATE_BURST
    }
}

/// Why this layer turned a pairing request away without showing it to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    RateLimited,
    TooManyPairingPeers,
    Busy,
    Closing,
}

impl Refusal {
    /// The reason sent back to the peer.
    pub(crate) fn reason(self) -> String {
        match self {
            Self::RateLimited => format!(
                "rate limited: at most {PAIR_RATE_BURST} pairing requests at once, then one per \
                 {PAIR_RATE_INTERVAL:?}; retry later"
            ),
            Self::TooManyPairingPeers => format!(
                "busy: {MAX_PAIRING_PEERS} other peers are pairing with this node; retry later"
            ),
            Self::Busy => "busy: too many pairing requests waiting for an answer".into(),
            Self::Closing => "this node is disconnecting from you".into(),
        }
    }
}

/// Per-peer token buckets, capped and kept across sessions.
#[derive(Debug, Default)]
pub(crate) struct RateTable {
    buckets: HashMap<PeerId, TokenBucket>,
}

impl RateTable {
    /// Charges one request to `peer`; false when it is over its rate or the table is full
    /// of peers still over theirs.
    pub(crate) fn try_take(&mut self, peer: PeerId, now: Instant) -> bool {
        if !self.buckets.contains_key(&peer) && self.buckets.len() >= MAX_PAIR_RATE_ENTRIES {
            self.prune(now);
            if self.buckets.len() >= MAX_PAIR_RATE_ENTRIES {
                return false;
            }
        }
        self.buckets
            .entry(peer)
            .or_insert_with(|| TokenBucket::new(now))
            .try_take(now)
    }

    /// Forgets peers whose bucket has refilled: a new bucket would be identical.
    pub(crate) fn prune(&mut self, now: Instant) {
        self.buckets.retain(|_, bucket| !bucket.is_full(now));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// The admission deadline of a non-admitted peer after pairing activity at `now`: another
/// `hello_timeout` from now, but never past `started + bound`, and never earlier than it
/// already was.
pub(crate) fn extended_deadline(
    current: Instant,
    now: Instant,
    started: Instant,
    hello_timeout: Duration,
    bound: Duration,
) -> Instant {
    let wanted = (now + hello_timeout).min(started + bound);
    current.max(wanted)
}

/// Cuts a refusal reason from a peer to a printable, bounded string.
pub(crate) fn sanitize_reason(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REFUSAL_REASON)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(t0);
        for _ in 0..PAIR_RATE_BURST {
            assert!(bucket.try_take(t0));
        }
        assert!(!bucket.try_take(t0), "the burst is spent");
        assert!(!bucket.try_take(t0 + PAIR_RATE_INTERVAL / 2));
        assert!(
            bucket.try_take(t0 + PAIR_RATE_INTERVAL),
            "one token regained"
        );
        assert!(!bucket.try_take(t0 + PAIR_RATE_INTERVAL));
        // Partial progress is kept: the next token comes one interval after the previous.
        assert!(bucket.try_take(t0 + PAIR_RATE_INTERVAL * 2));
        assert!(!bucket.is_full(t0 + PAIR_RATE_INTERVAL * 2));
        assert!(bucket.is_full(t0 + PAIR_RATE_INTERVAL * (2 + PAIR_RATE_BURST)));
        // Idle time never banks more than the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..PAIR_RATE_BURST {
            assert!(bucket.try_take(later));
        }
        assert!(!bucket.try_take(later));
    }

    #[test]
    fn rate_table_is_capped_and_prunes_idle_peers() {
        let t0 = Instant::now();
        let mut table = RateTable::default();
        let spent = PeerId::random();
        for _ in 0..PAIR_RATE_BURST {
            assert!(table.try_take(spent, t0));
        }
        assert!(!table.try_take(spent, t0));
        // Fill the table with peers that are still below a full bucket.
        while table.len() < MAX_PAIR_RATE_ENTRIES {
            assert!(table.try_take(PeerId::random(), t0));
        }
        assert!(
            !table.try_take(PeerId::random(), t0),
            "a full table refuses newcomers rather than growing"
        );
        // Once buckets refill, their entries go and newcomers fit again.
        let later = t0 + PAIR_RATE_INTERVAL * (PAIR_RATE_BURST + 1);
        assert!(table.try_take(PeerId::random(), later));
        assert_eq!(table.len(), 1);
        assert!(
            table.try_take(spent, later),
            "the spent peer has refilled too"
        );
    }

    #[test]
    fn deadline_extends_but_stops_at_the_bound() {
        let started = Instant::now();
        let hello = Duration::from_secs(10);
        let bound = Duration::from_secs(60);
        let first = started + hello;
        let at_5 = extended_deadline(
            first,
            started + Duration::from_secs(5),
            started,
            hello,
            bound,
        );
        assert_eq!(at_5, started + Duration::from_secs(15));
        let at_55 = extended_deadline(
            at_5,
            started + Duration::from_secs(55),
            started,
            hello,
            bound,
        );
        assert_eq!(at_55, started + bound, "capped at the bound");
        let shrink = extended_deadline(
            at_55,
            started + Duration::from_secs(1),
            started,
            hello,
            bound,
        );
        assert_eq!(shrink, at_55, "activity never brings a deadline forward");
        // A bound shorter than the hello timeout never cuts the original deadline.
        let short = extended_deadline(first, started, started, hello, Duration::from_secs(3));
        assert_eq!(short, first);
    }

    #[test]
    fn wire_messages_are_compact_cbor() {
        let request = PairRequestMsg {
            bytes: vec![7; 1000],
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&request, &mut buf).unwrap();
        assert!(buf.len() < 1020, "encoded {} bytes", buf.len());
        let response = PairResponseMsg::Reply(vec![9; MAX_PAIR_MESSAGE_SIZE]);
        let mut buf = Vec::new();
        ciborium::into_writer(&response, &mut buf).unwrap();
        assert!(
            buf.len() as u64 <= PAIR_WIRE_MAX,
            "a maximal reply fits the codec cap"
        );
        let back: PairResponseMsg = ciborium::from_reader(buf.as_slice()).unwrap();
        assert!(matches!(back, PairResponseMsg::Reply(b) if b.len() == MAX_PAIR_MESSAGE_SIZE));
    }

    #[test]
    fn refusal_reasons_from_peers_are_bounded_and_printable() {
        let hostile = format!("{}\u{1b}[2J{}", "x".repeat(10), "y".repeat(10_000));
        let clean = sanitize_reason(&hostile);
        assert_eq!(clean.chars().count(), MAX_REFUSAL_REASON);
        assert!(!clean.contains('\u{1b}'));
        assert!(Refusal::RateLimited.reason().contains("rate limited"));
    }
}
