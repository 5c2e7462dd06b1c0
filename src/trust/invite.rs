//! Invite codes, and the issuer's book of the codes it handed out.
//!
//! A code is one line of base58 with no spaces, so it survives being read aloud, typed,
//! pasted into a chat or put in a QR code. It reads `hearth1…`: the word `hearth` (all
//! base58 characters), the format version as one digit, then base58 of
//!
//! ```text
//! kind | expires_at (u64 BE, Unix s) | secret (32) | HomeId (16)
//! | issuer PeerId (u8 length + bytes) | address count (u8) | per address: u8 length + UTF-8
//! | checksum: first 4 bytes of SHA-256 over the version byte and everything before it
//! ```
//!
//! The prefix and version stay readable when the end of a code is lost, which base58 of a
//! whole byte string would not (dropping a trailing character shifts every byte). So a
//! truncated or mistyped code is reported as damaged, with "copy it again", rather than as
//! a wrong one or a failed pairing. The secret never appears in a log or an error: the
//! issuer keys its book by the [`CodeId`], a hash of the secret, and that id is also what
//! the joiner names in the clear when pairing starts.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use hearth_net::{Multiaddr, PeerId};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::error::TrustError;

/// Format version this build writes and reads.
pub(crate) const INVITE_VERSION: u8 = 1;
/// Most listen addresses a code carries; a code must stay short enough to type.
pub(crate) const MAX_INVITE_ADDRS: usize = 4;
/// Longest listen address a code carries, in bytes.
pub(crate) const MAX_INVITE_ADDR_LEN: usize = 96;
/// Longest PeerId a code carries, in bytes (an Ed25519 PeerId takes 38).
pub(crate) const MAX_INVITE_PEER_ID_LEN: usize = 64;
/// Longest code text accepted: the longest valid code, with room to spare. Checked
/// before base58 decoding, whose cost grows with the square of the length.
pub(crate) const MAX_CODE_CHARS: usize = 1024;
/// Longest lifetime a code may be given: one day.
pub(crate) const MAX_TTL_S: u64 = 24 * 3600;
/// Open codes an issuer keeps by default.
pub(crate) const DEFAULT_MAX_OUTSTANDING: usize = 16;
/// Pairing attempts a code allows. Each attempt lets the other side test one guess of
/// the secret, so a code that could be attempted forever could in principle be guessed.
pub(crate) const MAX_ATTEMPTS: u8 = 3;
/// How long a used, burned or expired code is remembered past its expiry, so that a
/// second try is told "already used" or "expired" rather than "unknown".
pub(crate) const TOMBSTONE_S: u64 = 3600;
/// Most used, burned or expired codes remembered at once.
pub(crate) const MAX_TOMBSTONES: usize = 256;

/// Start of every code; made of base58 characters so the whole code stays base58.
pub(crate) const CODE_PREFIX: &str = "hearth";
const SECRET_LEN: usize = 32;
const HOME_ID_BYTES: usize = 16;
const CHECKSUM_LEN: usize = 4;
/// kind + expiry + secret + home + peer length + address count.
const FIXED_LEN: usize = 1 + 8 + SECRET_LEN + HOME_ID_BYTES + 1 + 1;

/// What a code admits its holder to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum InviteKind {
    /// A new device joins the issuer's home.
    Device,
    /// Another home becomes known to the issuer's home.
    Home,
}

impl InviteKind {
    /// Stable tag used in codes and pairing transcripts.
    pub(crate) fn tag(self) -> u8 {
        match self {
            Self::Device => 1,
            Self::Home => 2,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Self::Device),
            2 => Some(Self::Home),
            _ => None,
        }
    }
}

impl fmt::Display for InviteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Device => "device",
            Self::Home => "home",
        })
    }
}

/// A code's one-time secret. Zeroed on drop; `Debug` shows only its [`CodeId`].
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct InviteSecret(Zeroizing<[u8; SECRET_LEN]>);

impl InviteSecret {
    /// Wraps 32 bytes, which the caller draws from the OS generator.
    pub(crate) fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The id that names this secret in logs, in the issuer's book and on the wire.
    pub(crate) fn code_id(&self) -> CodeId {
        let digest = Sha256::new()
            .chain_update(b"hearth invite id v1")
            .chain_update(*self.0)
            .finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        CodeId(id)
    }

    /// The raw secret, for the pairing exchange only.
    pub(crate) fn expose_secret(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }
}

impl fmt::Debug for InviteSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InviteSecret({})", self.code_id())
    }
}

/// Names an invite without revealing its secret: the first 16 bytes of a domain-separated
/// SHA-256 of it. The secret has 256 bits, so the id gives nothing away.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct CodeId([u8; 16]);

impl CodeId {
    /// Wraps bytes read from a pairing message.
    pub(crate) fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw id.
    pub(crate) fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for CodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodeId({self})")
    }
}

/// How the issuing node describes itself in every code it makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Issuer {
    /// The issuing device.
    pub(crate) peer_id: PeerId,
    /// Where it listens, best first; at most [`MAX_INVITE_ADDRS`] are used.
    pub(crate) addrs: Vec<String>,
    /// The home whose code it is.
    pub(crate) home_id: String,
}

/// A decoded invite code.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct InviteCode {
    kind: InviteKind,
    issuer: PeerId,
    addrs: Vec<String>,
    home_id: String,
    secret: InviteSecret,
    expires_at_s: u64,
}

impl InviteCode {
    /// Builds a code, refusing fields a joiner would refuse.
    pub(crate) fn new(
        kind: InviteKind,
        issuer: &Issuer,
        expires_at_s: u64,
        secret: InviteSecret,
    ) -> Result<Self, TrustError> {
        let invalid = |detail: String| TrustError::Invalid {
            what: "invite code",
            detail,
        };
        let issuer_len = issuer.peer_id.to_bytes().len();
        if issuer_len > MAX_INVITE_PEER_ID_LEN {
            return Err(invalid(format!("issuer PeerId takes {issuer_len} bytes")));
        }
        home_id_bytes(&issuer.home_id)
            .ok_or_else(|| invalid(format!("{:?} is not a HomeId", issuer.home_id)))?;
        let addrs: Vec<String> = issuer
            .addrs
            .iter()
            .take(MAX_INVITE_ADDRS)
            .cloned()
            .collect();
        for addr in &addrs {
            check_addr(addr).map_err(invalid)?;
        }
        Ok(Self {
            kind,
            issuer: issuer.peer_id,
            addrs,
            home_id: issuer.home_id.clone(),
            secret,
            expires_at_s,
        })
    }

    /// The code as one line of base58. This text holds the secret: hand it only to the
    /// person who asked for it, never to a log.
    pub(crate) fn encode(&self) -> String {
        let mut out = Vec::with_capacity(FIXED_LEN + 64 + CHECKSUM_LEN);
        out.push(self.kind.tag());
        out.extend_from_slice(&self.expires_at_s.to_be_bytes());
        out.extend_from_slice(self.secret.expose_secret());
        // `new` and `decode` both checked that the HomeId is 16 bytes of base58.
        out.extend_from_slice(&home_id_bytes(&self.home_id).unwrap_or([0; HOME_ID_BYTES]));
        let peer = self.issuer.to_bytes();
        // Lengths below were capped when the code was built, so they fit in a byte.
        out.push(peer.len() as u8);
        out.extend_from_slice(&peer);
        out.push(self.addrs.len() as u8);
        for addr in &self.addrs {
            out.push(addr.len() as u8);
            out.extend_from_slice(addr.as_bytes());
        }
        let sum = checksum(INVITE_VERSION, &out);
        out.extend_from_slice(&sum);
        let text = format!(
            "{CODE_PREFIX}{INVITE_VERSION}{}",
            bs58::encode(&out).into_string()
        );
        // The buffer held the secret in the clear.
        zeroize::Zeroize::zeroize(&mut out);
        text
    }

    /// Decodes a code and refuses it if it has expired at `now_s` (Unix seconds).
    pub(crate) fn parse(text: &str, now_s: u64) -> Result<Self, TrustError> {
        let code = Self::decode(text)?;
        if code.is_expired(now_s) {
            return Err(TrustError::InviteExpired);
        }
        Ok(code)
    }

    /// Decodes a code without looking at the clock. Leading and trailing whitespace, as a
    /// paste tends to bring, is ignored.
    pub(crate) fn decode(text: &str) -> Result<Self, TrustError> {
        let text = text.trim();
        if text.len() > MAX_CODE_CHARS {
            return Err(TrustError::InviteTooLong {
                len: text.chars().count(),
                max: MAX_CODE_CHARS,
            });
        }
        if text.is_empty() {
            return Err(TrustError::NotAnInvite("it is empty"));
        }
        let Some(rest) = text.strip_prefix(CODE_PREFIX) else {
            return Err(TrustError::NotAnInvite("it does not start with \"hearth\""));
        };
        let mut chars = rest.chars();
        // The version is read before anything else: a newer format may differ in the rest.
        let version = match chars.next().and_then(|c| c.to_digit(10)) {
            Some(v) if v != 0 => v as u8,
            _ => {
                return Err(TrustError::NotAnInvite(
                    "no format version follows \"hearth\"",
                ));
            }
        };
        if version != INVITE_VERSION {
            return Err(TrustError::InviteVersion {
                found: version,
                supported: INVITE_VERSION,
            });
        }
        let bytes = Zeroizing::new(bs58::decode(chars.as_str()).into_vec().map_err(|_| {
            TrustError::NotAnInvite("it holds characters that invite codes never contain")
        })?);
        // Past the prefix, anything wrong is most likely a copying slip.
        if bytes.len() < FIXED_LEN + CHECKSUM_LEN {
            return Err(TrustError::InviteDamaged);
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(version, body) != sum {
            return Err(TrustError::InviteDamaged);
        }
        // The checksum matched, so what follows was written by an encoder; a field out of
        // range here means a foreign or buggy encoder, which is still not a usable code.
        let mut r = Reader { rest: body };
        let kind = InviteKind::from_tag(r.byte()?).ok_or(TrustError::NotAnInvite(
            "it is for a kind of pairing this Hearth does not know",
        ))?;
        let expires_at_s = u64::from_be_bytes(r.array()?);
        let secret = InviteSecret::from_bytes(r.array()?);
        let home_id = bs58::encode(r.array::<HOME_ID_BYTES>()?).into_string();
        let peer_len = usize::from(r.byte()?);
        if peer_len > MAX_INVITE_PEER_ID_LEN {
            return Err(TrustError::NotAnInvite("its issuer is out of range"));
        }
        let issuer = PeerId::from_bytes(r.take(peer_len)?)
            .map_err(|_| TrustError::NotAnInvite("its issuer is not a PeerId"))?;
        let count = usize::from(r.byte()?);
        if count > MAX_INVITE_ADDRS {
            return Err(TrustError::NotAnInvite("it lists too many addresses"));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let len = usize::from(r.byte()?);
            let addr = std::str::from_utf8(r.take(len)?)
                .map_err(|_| TrustError::NotAnInvite("it lists an address that is not text"))?;
            check_addr(addr)
                .map_err(|_| TrustError::NotAnInvite("it lists an address that does not parse"))?;
            addrs.push(addr.to_string());
        }
        if !r.rest.is_empty() {
            return Err(TrustError::NotAnInvite("it has bytes after its last field"));
        }
        Ok(Self {
            kind,
            issuer,
            addrs,
            home_id,
            secret,
            expires_at_s,
        })
    }

    /// Whether the code is past its expiry at `now_s` (Unix seconds).
    pub(crate) fn is_expired(&self, now_s: u64) -> bool {
        now_s >= self.expires_at_s
    }

    /// What the code admits its holder to.
    pub(crate) fn kind(&self) -> InviteKind {
        self.kind
    }

    /// The device that issued the code and runs the pairing exchange.
    pub(crate) fn issuer(&self) -> &PeerId {
        &self.issuer
    }

    /// Where the issuer listens, as multiaddr text.
    pub(crate) fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The issuer's home.
    pub(crate) fn home_id(&self) -> &str {
        &self.home_id
    }

    /// When the code stops working, in Unix seconds.
    pub(crate) fn expires_at_s(&self) -> u64 {
        self.expires_at_s
    }

    /// The id the issuer knows this code by.
    pub(crate) fn code_id(&self) -> CodeId {
        self.secret.code_id()
    }

    /// The one-time secret, for the pairing exchange.
    pub(crate) fn secret(&self) -> &InviteSecret {
        &self.secret
    }
}

impl fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InviteCode")
            .field("id", &self.code_id())
            .field("kind", &self.kind)
            .field("issuer", &self.issuer.to_base58())
            .field("addrs", &self.addrs)
            .field("home_id", &self.home_id)
            .field("expires_at_s", &self.expires_at_s)
            .finish_non_exhaustive()
    }
}

/// Cursor over a code's bytes whose every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TrustError> {
        if self.rest.len() < n {
            return Err(TrustError::NotAnInvite("it ends in the middle of a field"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, TrustError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TrustError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

fn checksum(version: u8, body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::new()
        .chain_update([version])
        .chain_update(body)
        .finalize();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

fn home_id_bytes(home_id: &str) -> Option<[u8; HOME_ID_BYTES]> {
    let mut out = [0u8; HOME_ID_BYTES];
    match bs58::decode(home_id).onto(&mut out[..]) {
        // Re-encoding must give the same text, so one HomeId has one code form.
        Ok(HOME_ID_BYTES) if bs58::encode(out).into_string() == home_id => Some(out),
        _ => None,
    }
}

fn check_addr(addr: &str) -> Result<(), String> {
    if addr.len() > MAX_INVITE_ADDR_LEN {
        return Err(format!(
            "address is {} bytes long, at most {MAX_INVITE_ADDR_LEN} are allowed",
            addr.len()
        ));
    }
    Multiaddr::from_str(addr)
        .map(|_| ())
        .map_err(|_| format!("{addr:?} is not a multiaddr"))
}

/// What the issuer's book says about an open code, for the pairing exchange.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct OpenInvite {
    /// The code's id.
    pub(crate) id: CodeId,
    /// What it admits.
    pub(crate) kind: InviteKind,
    /// The issuer's home.
    pub(crate) home_id: String,
    /// The secret the joiner must prove it knows.
    pub(crate) secret: InviteSecret,
}

impl fmt::Debug for OpenInvite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenInvite")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("home_id", &self.home_id)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    Used,
}

struct Entry {
    kind: InviteKind,
    home_id: String,
    expires_at_s: u64,
    issued_at_s: u64,
    attempts: u8,
    state: State,
    /// Dropped (and so zeroed) once the code can no longer be used.
    secret: Option<InviteSecret>,
}

impl Entry {
    fn is_open(&self, now_s: u64) -> bool {
        self.state == State::Open && now_s < self.expires_at_s && self.attempts < MAX_ATTEMPTS
    }
}

/// The codes a node issued: it makes each single-use and time-limited, and caps how many
/// are open at once.
///
/// Rules, in the order the pairing exchange applies them:
/// - A code the book never issued, or forgot (see [`TOMBSTONE_S`]), is unknown.
/// - A code past its expiry is expired, even while a pairing with it is under way.
/// - Each pairing attempt counts when the issuer answers the joiner's first message, since
///   that answer lets the joiner test one guess of the secret. A code allows
///   [`MAX_ATTEMPTS`]; after that it is burned, whatever became of the attempts.
/// - A wrong secret changes nothing else: the code stays open for its remaining attempts.
/// - A code is consumed only when a pairing succeeds, and works once.
pub(crate) struct InviteBook {
    max_outstanding: usize,
    entries: HashMap<CodeId, Entry>,
}

impl InviteBook {
    /// A book that allows at most `max_outstanding` open codes at once.
    pub(crate) fn new(max_outstanding: usize) -> Self {
        Self {
            max_outstanding,
            entries: HashMap::new(),
        }
    }

    /// Issues a code that lives `ttl_s` seconds from `now_s`, around a secret the caller
    /// drew from the OS generator.
    pub(crate) fn issue(
        &mut self,
        kind: InviteKind,
        issuer: &Issuer,
        ttl_s: u64,
        now_s: u64,
        secret: [u8; SECRET_LEN],
    ) -> Result<InviteCode, TrustError> {
        if ttl_s == 0 || ttl_s > MAX_TTL_S {
            return Err(TrustError::Invalid {
                what: "invite lifetime",
                detail: format!("{ttl_s} s is outside 1 s to {MAX_TTL_S} s"),
            });
        }
        self.prune(now_s);
        if self.open_count(now_s) >= self.max_outstanding {
            return Err(TrustError::TooManyInvites {
                max: self.max_outstanding,
            });
        }
        let secret = InviteSecret::from_bytes(secret);
        let id = secret.code_id();
        if self.entries.contains_key(&id) {
            // Only a caller that reused a secret gets here; 256 random bits never collide.
            return Err(TrustError::Invalid {
                what: "invite secret",
                detail: "it was used for an earlier code".into(),
            });
        }
        let code = InviteCode::new(kind, issuer, now_s.saturating_add(ttl_s), secret.clone())?;
        self.entries.insert(
            id,
            Entry {
                kind,
                home_id: issuer.home_id.clone(),
                expires_at_s: code.expires_at_s(),
                issued_at_s: now_s,
                attempts: 0,
                state: State::Open,
                secret: Some(secret),
            },
        );
        Ok(code)
    }

    /// Looks a code up without changing anything.
    pub(crate) fn check(&self, id: &CodeId, now_s: u64) -> Result<OpenInvite, TrustError> {
        let entry = self.entries.get(id).ok_or(TrustError::InviteUnknown)?;
        if entry.state == State::Used {
            return Err(TrustError::InviteUsed);
        }
        if now_s >= entry.expires_at_s {
            return Err(TrustError::InviteExpired);
        }
        if entry.attempts >= MAX_ATTEMPTS {
            return Err(TrustError::InviteBurned {
                attempts: entry.attempts,
            });
        }
        let secret = entry.secret.clone().ok_or(TrustError::InviteUsed)?;
        Ok(OpenInvite {
            id: *id,
            kind: entry.kind,
            home_id: entry.home_id.clone(),
            secret,
        })
    }

    /// Checks a code and counts one pairing attempt against it.
    pub(crate) fn begin_attempt(
        &mut self,
        id: &CodeId,
        now_s: u64,
    ) -> Result<OpenInvite, TrustError> {
        let open = self.check(id, now_s)?;
        if let Some(entry) = self.entries.get_mut(id) {
            entry.attempts = entry.attempts.saturating_add(1);
        }
        Ok(open)
    }

    /// Marks a code used after a successful pairing. Fails, and changes nothing, if the
    /// code was used, expired or withdrawn since the attempt began; the pairing must then
    /// not be granted.
    pub(crate) fn consume(&mut self, id: &CodeId, now_s: u64) -> Result<(), TrustError> {
        let entry = self.entries.get_mut(id).ok_or(TrustError::InviteUnknown)?;
        if entry.state == State::Used {
            return Err(TrustError::InviteUsed);
        }
        if now_s >= entry.expires_at_s {
            return Err(TrustError::InviteExpired);
        }
        entry.state = State::Used;
        entry.secret = None;
        Ok(())
    }

    /// Notes that an attempt failed on a wrong secret. The attempt was already counted;
    /// once no attempts are left the secret is dropped at once rather than at pruning.
    pub(crate) fn attempt_failed(&mut self, id: &CodeId) {
        if let Some(entry) = self.entries.get_mut(id)
            && entry.attempts >= MAX_ATTEMPTS
        {
            entry.secret = None;
        }
    }

    /// Codes that could still be used at `now_s`.
    pub(crate) fn open_count(&self, now_s: u64) -> usize {
        self.entries.values().filter(|e| e.is_open(now_s)).count()
    }

    /// Attempts left for a code, or `None` if the book does not know it.
    #[cfg(test)]
    pub(crate) fn attempts_left(&self, id: &CodeId) -> Option<u8> {
        self.entries
            .get(id)
            .map(|e| MAX_ATTEMPTS.saturating_sub(e.attempts))
    }

    /// Forgets codes long past their expiry, and the oldest closed codes beyond
    /// [`MAX_TOMBSTONES`], so that the book stays bounded however many codes are issued.
    fn prune(&mut self, now_s: u64) {
        self.entries
            .retain(|_, e| now_s < e.expires_at_s.saturating_add(TOMBSTONE_S));
        for e in self.entries.values_mut() {
            if !e.is_open(now_s) {
                e.secret = None;
            }
        }
        let mut closed: Vec<(u64, CodeId)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.is_open(now_s))
            .map(|(id, e)| (e.issued_at_s, *id))
            .collect();
        if closed.len() > MAX_TOMBSTONES {
            closed.sort();
            let excess = closed.len() - MAX_TOMBSTONES;
            for (_, id) in closed.into_iter().take(excess) {
                self.entries.remove(&id);
            }
        }
    }
}

impl Default for InviteBook {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_OUTSTANDING)
    }
}

impl fmt::Debug for InviteBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InviteBook")
            .field("max_outstanding", &self.max_outstanding)
            .field("known", &self.entries.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) const NOW: u64 = 1_763_790_000;

    pub(crate) fn issuer() -> Issuer {
        Issuer {
            peer_id: hearth_net::DeviceIdentity::generate().to_peer_id(),
            addrs: vec![
                "/ip4/192.168.1.20/tcp/4001".into(),
                "/ip6/fe80::1/udp/4001/quic-v1".into(),
            ],
            home_id: crate::home::home_id_for(&[7; 32]),
        }
    }

    fn code(kind: InviteKind) -> InviteCode {
        InviteCode::new(
            kind,
            &issuer(),
            NOW + 600,
            InviteSecret::from_bytes([0x5a; 32]),
        )
        .unwrap()
    }

    #[test]
    fn codes_round_trip_as_one_line_of_base58() {
        for kind in [InviteKind::Device, InviteKind::Home] {
            let code = code(kind);
            let text = code.encode();
            assert!(!text.contains(char::is_whitespace));
            assert!(text.chars().all(|c| c.is_ascii_alphanumeric()));
            assert!(text.len() < MAX_CODE_CHARS);
            let back = InviteCode::parse(&format!("  {text}\n"), NOW).unwrap();
            assert_eq!(back, code);
            assert_eq!(back.kind(), kind);
            assert_eq!(back.addrs(), code.addrs());
            assert_eq!(back.home_id(), code.home_id());
            assert_eq!(back.issuer(), code.issuer());
            assert_eq!(back.expires_at_s(), NOW + 600);
            assert_eq!(back.code_id(), code.code_id());
        }
    }

    #[test]
    fn bad_codes_say_what_is_wrong() {
        let text = code(InviteKind::Device).encode();
        let msg = |t: &str| InviteCode::parse(t, NOW).unwrap_err().to_string();

        assert!(msg("").starts_with("this is not a Hearth invite code"));
        assert!(msg("hello world").starts_with("this is not a Hearth invite code"));
        assert!(msg("0OIl").starts_with("this is not a Hearth invite code"));
        assert!(
            msg(&bs58::encode(b"something else entirely").into_string())
                .starts_with("this is not a Hearth invite code")
        );
        assert!(msg(&"2".repeat(MAX_CODE_CHARS + 1)).contains("characters long"));

        assert!(msg("hearthX").contains("no format version"));

        // Truncated or altered in copying: the checksum catches it.
        assert!(text.starts_with("hearth1"));
        for cut in [1, 2, 5, 40, text.len() - 8] {
            assert_eq!(
                msg(&text[..text.len() - cut]),
                TrustError::InviteDamaged.to_string()
            );
        }
        let mut chars: Vec<char> = text.chars().collect();
        for i in [7, 20, chars.len() - 1] {
            let before = chars[i];
            chars[i] = if before == 'z' { 'y' } else { 'z' };
            let m = msg(&chars.iter().collect::<String>());
            assert!(m.contains("damaged"), "char {i}: {m}");
            chars[i] = before;
        }
        assert!(msg(&text.replace('h', "0")).starts_with("this is not a Hearth invite code"));

        let expired = InviteCode::parse(&text, NOW + 600).unwrap_err();
        assert_eq!(expired, TrustError::InviteExpired);
        assert_eq!(
            expired.to_string(),
            "this invite code has expired; ask for a new one with `hearth invite`"
        );
    }

    #[test]
    fn another_format_version_is_named() {
        let text = code(InviteKind::Device).encode();
        let err = InviteCode::decode(&text.replacen("hearth1", "hearth9", 1)).unwrap_err();
        assert_eq!(
            err,
            TrustError::InviteVersion {
                found: 9,
                supported: INVITE_VERSION
            }
        );
        assert!(err.to_string().contains("update Hearth"));
    }

    /// Re-encodes a code's body after `alter`, with a fresh checksum.
    fn reframe(text: &str, alter: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut bytes = bs58::decode(&text[7..]).into_vec().unwrap();
        bytes.truncate(bytes.len() - CHECKSUM_LEN);
        alter(&mut bytes);
        let sum = checksum(INVITE_VERSION, &bytes);
        bytes.extend_from_slice(&sum);
        format!("hearth1{}", bs58::encode(&bytes).into_string())
    }

    #[test]
    fn out_of_range_fields_behind_a_valid_checksum_are_refused() {
        let original = code(InviteKind::Device);
        let text = original.encode();
        assert_eq!(
            InviteCode::decode(&reframe(&text, |_| {})).unwrap(),
            original
        );

        let err = InviteCode::decode(&reframe(&text, |b| b[0] = 77)).unwrap_err();
        assert!(err.to_string().contains("kind of pairing"), "{err}");
        let err = InviteCode::decode(&reframe(&text, |b| b.push(0))).unwrap_err();
        assert!(err.to_string().contains("after its last field"), "{err}");
        let err = InviteCode::decode(&reframe(&text, |b| b.truncate(b.len() - 3))).unwrap_err();
        assert!(err.to_string().contains("middle of a field"), "{err}");
    }

    #[test]
    fn codes_refuse_out_of_range_fields_when_built() {
        let mut too_long = issuer();
        too_long.addrs = vec![format!("/dns4/{}/tcp/1", "a".repeat(MAX_INVITE_ADDR_LEN))];
        assert!(
            InviteCode::new(
                InviteKind::Device,
                &too_long,
                NOW,
                InviteSecret::from_bytes([1; 32])
            )
            .is_err()
        );

        let mut not_addr = issuer();
        not_addr.addrs = vec!["192.168.1.2:4001".into()];
        assert!(
            InviteCode::new(
                InviteKind::Device,
                &not_addr,
                NOW,
                InviteSecret::from_bytes([1; 32])
            )
            .is_err()
        );

        let mut bad_home = issuer();
        bad_home.home_id = "not-a-home".into();
        assert!(
            InviteCode::new(
                InviteKind::Device,
                &bad_home,
                NOW,
                InviteSecret::from_bytes([1; 32])
            )
            .is_err()
        );

        // Extra addresses are dropped rather than refused: the first ones are the best.
        let mut many = issuer();
        many.addrs = (0..10)
            .map(|i| format!("/ip4/10.0.0.{i}/tcp/4001"))
            .collect();
        let code = InviteCode::new(
            InviteKind::Device,
            &many,
            NOW,
            InviteSecret::from_bytes([1; 32]),
        )
        .unwrap();
        assert_eq!(code.addrs().len(), MAX_INVITE_ADDRS);
        assert_eq!(code.addrs()[0], "/ip4/10.0.0.0/tcp/4001");
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let code = code(InviteKind::Device);
        let text = code.encode();
        let secret_hex = hex::encode([0x5a; 32]);
        let mut book = InviteBook::default();
        let issued = book
            .issue(InviteKind::Home, &issuer(), 600, NOW, [0x5a; 32])
            .unwrap();
        let open = book.check(&issued.code_id(), NOW).unwrap();
        for dbg in [
            format!("{code:?}"),
            format!("{:?}", code.secret()),
            format!("{open:?}"),
            format!("{book:?}"),
        ] {
            assert!(!dbg.contains(&secret_hex), "{dbg}");
            assert!(!dbg.contains("90, 90"), "{dbg}");
            assert!(!dbg.contains(&text), "{dbg}");
        }
        assert!(format!("{code:?}").contains(&code.code_id().to_string()));
    }

    #[test]
    fn the_book_makes_codes_single_use() {
        let mut book = InviteBook::default();
        let code = book
            .issue(InviteKind::Device, &issuer(), 600, NOW, [1; 32])
            .unwrap();
        let id = code.code_id();
        let open = book.begin_attempt(&id, NOW + 1).unwrap();
        assert_eq!(open.secret, *code.secret());
        assert_eq!(open.kind, InviteKind::Device);
        book.consume(&id, NOW + 2).unwrap();
        assert_eq!(book.check(&id, NOW + 3), Err(TrustError::InviteUsed));
        assert_eq!(
            book.begin_attempt(&id, NOW + 3),
            Err(TrustError::InviteUsed)
        );
        assert_eq!(book.consume(&id, NOW + 3), Err(TrustError::InviteUsed));
        assert_eq!(book.open_count(NOW + 3), 0);
    }

    #[test]
    fn the_book_enforces_expiry_attempts_and_its_cap() {
        let mut book = InviteBook::new(2);
        let a = book
            .issue(InviteKind::Device, &issuer(), 60, NOW, [1; 32])
            .unwrap();
        let b = book
            .issue(InviteKind::Home, &issuer(), 600, NOW, [2; 32])
            .unwrap();
        assert_eq!(
            book.issue(InviteKind::Device, &issuer(), 600, NOW, [3; 32])
                .unwrap_err(),
            TrustError::TooManyInvites { max: 2 }
        );

        // Expiry frees a slot, and the expired code says so rather than "unknown".
        assert_eq!(
            book.check(&a.code_id(), NOW + 60),
            Err(TrustError::InviteExpired)
        );
        assert_eq!(
            book.consume(&a.code_id(), NOW + 60),
            Err(TrustError::InviteExpired)
        );
        book.issue(InviteKind::Device, &issuer(), 600, NOW + 60, [3; 32])
            .unwrap();

        // Three attempts, then the code is burned.
        for left in (0..MAX_ATTEMPTS).rev() {
            book.begin_attempt(&b.code_id(), NOW + 1).unwrap();
            book.attempt_failed(&b.code_id());
            assert_eq!(book.attempts_left(&b.code_id()), Some(left));
        }
        assert_eq!(
            book.begin_attempt(&b.code_id(), NOW + 2),
            Err(TrustError::InviteBurned {
                attempts: MAX_ATTEMPTS
            })
        );

        assert_eq!(
            book.check(&CodeId::from_bytes([0; 16]), NOW),
            Err(TrustError::InviteUnknown)
        );
    }

    #[test]
    fn the_book_refuses_silly_lifetimes_and_reused_secrets() {
        let mut book = InviteBook::default();
        assert!(
            book.issue(InviteKind::Device, &issuer(), 0, NOW, [1; 32])
                .is_err()
        );
        assert!(
            book.issue(InviteKind::Device, &issuer(), MAX_TTL_S + 1, NOW, [1; 32])
                .is_err()
        );
        book.issue(InviteKind::Device, &issuer(), 60, NOW, [1; 32])
            .unwrap();
        assert!(
            book.issue(InviteKind::Device, &issuer(), 60, NOW, [1; 32])
                .is_err()
        );
    }

    #[test]
    fn the_book_stays_bounded() {
        let mut book = InviteBook::new(4);
        let issuer = issuer();
        for i in 0..(MAX_TOMBSTONES as u64 + 50) {
            let mut secret = [0u8; 32];
            secret[..8].copy_from_slice(&i.to_be_bytes());
            let code = book
                .issue(InviteKind::Device, &issuer, 600, NOW + i, secret)
                .unwrap();
            book.consume(&code.code_id(), NOW + i).unwrap();
        }
        assert!(book.entries.len() <= MAX_TOMBSTONES + 4);
        // Long after expiry everything is forgotten.
        book.prune(NOW + 10 * MAX_TTL_S);
        assert!(book.entries.is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,600}") {
            let _ = InviteCode::decode(&text);
        }

        #[test]
        fn arbitrary_bytes_in_base58_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = InviteCode::decode(&bs58::encode(&bytes).into_string());
            let _ = InviteCode::decode(&format!("hearth1{}", bs58::encode(&bytes).into_string()));
            // With a valid checksum, parsing goes all the way through the fields.
            let mut framed = bytes.clone();
            let sum = checksum(INVITE_VERSION, &framed);
            framed.extend_from_slice(&sum);
            let _ = InviteCode::decode(&format!("hearth1{}", bs58::encode(&framed).into_string()));
        }
    }
}
