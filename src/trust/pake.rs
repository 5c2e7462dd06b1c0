//! The pairing exchange: the joiner proves it holds an invite's secret without sending it,
//! and the issuer answers with a sealed grant.
//!
//! A sans-IO state machine; the caller moves bytes over the (Noise-authenticated) pairing
//! stream, passes the clock in, and closes the stream when a step fails, after sending the
//! step's refusal if it has one. Four messages, each a CBOR [`PairMessage`]:
//!
//! ```text
//! joiner                                              issuer
//!   Start { code id, joiner PeerId, SPAKE2 A }  ->      looks the code up (unknown, used,
//!                                                       expired, burned: Refused), counts
//!                                                       one attempt
//!                                             <-  Reply { SPAKE2 B, issuer MAC }
//!   checks the issuer MAC (wrong secret: Refused)
//!   Confirm { joiner MAC, sealed joiner info }  ->      checks the joiner MAC (wrong
//!                                                       secret: Refused), opens the info
//!                                                       ... issues a certificate ...
//!                                                       consumes the code
//!                                             <-  Grant { sealed grant }
//! ```
//!
//! SPAKE2 (Ed25519 group) runs with the invite secret as the password and the two PeerIds
//! as identities A (joiner) and B (issuer). HKDF-SHA256 turns its key into two MAC keys and
//! two sealing keys, one of each per direction. Each MAC covers a transcript of the code
//! id, kind, HomeId, both PeerIds and both SPAKE2 messages, so both sides know they agree
//! on all of it. The MACs are the key confirmation: whichever side holds the wrong secret,
//! both find out, the joiner from the issuer's MAC and the issuer from the joiner's MAC (or
//! from the joiner's refusal, whichever comes first).
//!
//! What the issuer's book does (see [`InviteBook`]): an attempt counts when the issuer
//! sends its Reply, because from then on the joiner can test its one guess. A wrong secret
//! changes nothing else; after [`MAX_ATTEMPTS`](super::invite::MAX_ATTEMPTS) attempts the
//! code is burned. The code is consumed only when the grant is sealed, so a pairing that
//! fails anywhere before that leaves it usable.
//!
//! spake2 0.4 keeps its copy of the password in a plain `Vec` that it does not zero on
//! drop; the handshake states live for one pairing only, and everything this module owns
//! is zeroed.

use std::fmt;
use std::str::FromStr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hearth_net::PeerId;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use zeroize::Zeroizing;

use super::error::TrustError;
use super::invite::{CodeId, InviteBook, InviteCode, InviteKind, InviteSecret, MAX_ATTEMPTS};
use super::wire::{Transcript, from_cbor, random_bytes, to_cbor};

/// Version of the pairing exchange, sent in the first message.
pub(crate) const PAIR_VERSION: u8 = 1;
/// Largest grant the issuer sends: the certificate, the home's public record and the home
/// document together.
pub(crate) const MAX_GRANT_LEN: usize = 1024 * 1024;
/// Largest opaque payload a joiner sends about itself (for a home code: its own home's
/// public parts).
pub(crate) const MAX_JOINER_EXTRA_LEN: usize = 64 * 1024;
/// Largest pairing message: a grant plus its framing.
pub(crate) const MAX_PAIR_MESSAGE_LEN: usize = MAX_GRANT_LEN + 4096;

/// Length of a SPAKE2 message over Ed25519: a side byte and a compressed point.
const SPAKE_MSG_LEN: usize = 33;
const MAX_JOINER_INFO_LEN: usize = MAX_JOINER_EXTRA_LEN + 1024;
const NONCE_LEN: usize = 24;
const TRANSCRIPT_DOMAIN: &[u8] = b"hearth pair transcript v1";
const KDF_SALT_DOMAIN: &[u8] = b"hearth pair v1";
const GRANT_AD: &[u8] = b"hearth pair grant v1";
const JOINER_AD: &[u8] = b"hearth pair joiner v1";

type HmacSha256 = Hmac<Sha256>;

/// Why one side gives up, told to the other so that both show the same reason. Not
/// authenticated: it can only end an exchange, never make one succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Refusal {
    /// The issuer has no such code.
    UnknownCode,
    /// The code was already used.
    CodeUsed,
    /// The code has expired.
    CodeExpired,
    /// The code ran out of attempts.
    CodeBurned,
    /// The key confirmation failed.
    WrongSecret,
    /// The joiner named another PeerId than its connection's.
    PeerMismatch,
    /// The exchange's version is not one this side speaks.
    Version,
    /// A message did not decode, or came out of turn.
    Malformed,
    /// The issuer could not complete the grant.
    Failed,
}

impl Refusal {
    /// The error the refused side reports.
    fn to_error(self) -> TrustError {
        match self {
            Self::UnknownCode => TrustError::InviteUnknown,
            Self::CodeUsed => TrustError::InviteUsed,
            Self::CodeExpired => TrustError::InviteExpired,
            Self::CodeBurned => TrustError::InviteBurned {
                attempts: MAX_ATTEMPTS,
            },
            Self::WrongSecret => TrustError::WrongSecret,
            Self::PeerMismatch => TrustError::PeerMismatch,
            Self::Version => TrustError::Pairing(
                "the other device runs an incompatible version of Hearth; update both".into(),
            ),
            Self::Malformed => {
                TrustError::Pairing("the other device could not read this device's message".into())
            }
            Self::Failed => {
                TrustError::Pairing("the other device could not complete the pairing".into())
            }
        }
    }

    /// The refusal that tells the other side about a local error.
    fn for_error(error: &TrustError) -> Self {
        match error {
            TrustError::InviteUnknown => Self::UnknownCode,
            TrustError::InviteUsed => Self::CodeUsed,
            TrustError::InviteExpired => Self::CodeExpired,
            TrustError::InviteBurned { .. } => Self::CodeBurned,
            TrustError::WrongSecret => Self::WrongSecret,
            TrustError::PeerMismatch => Self::PeerMismatch,
            TrustError::Malformed { .. } | TrustError::TooLarge { .. } => Self::Malformed,
            _ => Self::Failed,
        }
    }
}

/// One message of the exchange.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PairMessage {
    /// Joiner to issuer: which code, who is joining, and the first SPAKE2 message.
    Start {
        /// [`PAIR_VERSION`].
        version: u8,
        /// The code's id; the secret itself is never sent.
        #[serde(with = "serde_bytes")]
        code_id: [u8; 16],
        /// The joiner's PeerId, which must match its connection.
        joiner: String,
        /// SPAKE2 message of side A.
        spake: ByteBuf,
    },
    /// Issuer to joiner: SPAKE2 message of side B and the issuer's key confirmation.
    Reply {
        /// SPAKE2 message of side B.
        spake: ByteBuf,
        /// HMAC-SHA256 of the transcript under the issuer's confirmation key.
        #[serde(with = "serde_bytes")]
        confirm: [u8; 32],
    },
    /// Joiner to issuer: the joiner's key confirmation and, sealed, what it says about
    /// itself.
    Confirm {
        /// HMAC-SHA256 of the transcript under the joiner's confirmation key.
        #[serde(with = "serde_bytes")]
        confirm: [u8; 32],
        /// Nonce of `sealed`.
        #[serde(with = "serde_bytes")]
        nonce: [u8; NONCE_LEN],
        /// A [`JoinerInfo`], sealed under the joiner's sealing key.
        sealed: ByteBuf,
    },
    /// Issuer to joiner: the grant, sealed.
    Grant {
        /// Nonce of `sealed`.
        #[serde(with = "serde_bytes")]
        nonce: [u8; NONCE_LEN],
        /// A [`Grant`], sealed under the issuer's sealing key.
        sealed: ByteBuf,
    },
    /// Either side gives up.
    Refused {
        /// Why.
        reason: Refusal,
    },
}

impl PairMessage {
    /// Decodes a message from the other side; the size cap is checked first.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        from_cbor("pairing message", bytes, MAX_PAIR_MESSAGE_LEN)
    }

    /// Encodes the message for the pairing stream.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, TrustError> {
        to_cbor("pairing message", self)
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Start { .. } => "Start",
            Self::Reply { .. } => "Reply",
            Self::Confirm { .. } => "Confirm",
            Self::Grant { .. } => "Grant",
            Self::Refused { .. } => "Refused",
        }
    }
}

impl fmt::Debug for PairMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Sealed payloads and MACs say nothing useful in a log.
        match self {
            Self::Refused { reason } => write!(f, "Refused({reason:?})"),
            other => write!(f, "{}(..)", other.name()),
        }
    }
}

/// The refusal message for `reason`, to send before closing the stream.
pub(crate) fn refusal(reason: Refusal) -> Result<Vec<u8>, TrustError> {
    PairMessage::Refused { reason }.encode()
}

/// What the joining device tells the issuer about itself, sealed in its Confirm.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JoinerInfo {
    /// The device's X25519 public key, for its certificate.
    #[serde(with = "serde_bytes")]
    pub(crate) x25519_public: [u8; 32],
    /// The name the device wants to be known by.
    pub(crate) device_name: String,
    /// Opaque to this module: for a home code, the joining home's public parts.
    pub(crate) extra: ByteBuf,
}

impl fmt::Debug for JoinerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinerInfo")
            .field("device_name", &self.device_name)
            .field("extra_len", &self.extra.len())
            .finish_non_exhaustive()
    }
}

/// What the issuer hands a joiner that proved it holds the code. Opaque bytes here; the
/// node encodes and checks each part.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Grant {
    /// For a device code, the joiner's certificate; empty for a home code.
    pub(crate) certificate: ByteBuf,
    /// The issuer home's public record: HomeId, name, root public key.
    pub(crate) home: ByteBuf,
    /// The issuer home's document, or the parts of it a paired home may see.
    pub(crate) home_doc: ByteBuf,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The home document holds wrapped keys and device details; lengths are enough.
        f.debug_struct("Grant")
            .field("certificate_len", &self.certificate.len())
            .field("home_len", &self.home.len())
            .field("home_doc_len", &self.home_doc.len())
            .finish()
    }
}

/// A step that failed: the error to report here, and the refusal (if any) to send the
/// other side before closing the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// What went wrong, for this side's user.
    pub(crate) error: TrustError,
    /// Encoded [`PairMessage::Refused`] to send, or `None` when the other side already
    /// knows (it refused first).
    pub(crate) reply: Option<Vec<u8>>,
}

impl Failure {
    /// A failure that tells the other side why.
    fn tell(error: TrustError) -> Self {
        let reply = refusal(Refusal::for_error(&error)).ok();
        Self { error, reply }
    }

    /// A failure the other side caused and already knows about.
    fn quiet(error: TrustError) -> Self {
        Self { error, reply: None }
    }

    /// A message that is not the one this step waits for.
    fn unexpected(got: &PairMessage, want: &str) -> Self {
        match got {
            PairMessage::Refused { reason } => Self::quiet(reason.to_error()),
            other => Self::tell(TrustError::Malformed {
                what: "pairing message",
                detail: format!("expected {want}, got {}", other.name()),
            }),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// Keys both sides derive from the SPAKE2 key. Zeroed on drop.
struct SessionKeys {
    confirm_issuer: Zeroizing<[u8; 32]>,
    confirm_joiner: Zeroizing<[u8; 32]>,
    seal_issuer: Zeroizing<[u8; 32]>,
    seal_joiner: Zeroizing<[u8; 32]>,
}

impl SessionKeys {
    fn derive(spake_key: &[u8], code_id: &CodeId) -> Result<Self, TrustError> {
        let mut salt = KDF_SALT_DOMAIN.to_vec();
        salt.extend_from_slice(code_id.as_bytes());
        let hk = Hkdf::<Sha256>::new(Some(&salt), spake_key);
        let expand = |info: &[u8]| -> Result<Zeroizing<[u8; 32]>, TrustError> {
            let mut out = Zeroizing::new([0u8; 32]);
            hk.expand(info, out.as_mut())
                .map_err(|_| TrustError::Encode {
                    what: "pairing keys",
                    detail: "HKDF refused a 32-byte output".into(),
                })?;
            Ok(out)
        };
        Ok(Self {
            confirm_issuer: expand(b"issuer confirm")?,
            confirm_joiner: expand(b"joiner confirm")?,
            seal_issuer: expand(b"issuer seal")?,
            seal_joiner: expand(b"joiner seal")?,
        })
    }
}

/// What both sides must agree on, hashed; each MAC and sealed payload is bound to it.
struct Context {
    code_id: CodeId,
    kind: InviteKind,
    home_id: String,
    issuer: String,
    joiner: String,
}

impl Context {
    fn transcript_hash(&self, spake_a: &[u8], spake_b: &[u8]) -> [u8; 32] {
        let mut t = Transcript::new(TRANSCRIPT_DOMAIN);
        t.u8(PAIR_VERSION)
            .bytes_field(self.code_id.as_bytes())
            .u8(self.kind.tag())
            .str_field(&self.home_id)
            .str_field(&self.issuer)
            .str_field(&self.joiner)
            .bytes_field(spake_a)
            .bytes_field(spake_b);
        Sha256::digest(t.finish()).into()
    }
}

fn mac(key: &[u8; 32], transcript: &[u8; 32]) -> Result<[u8; 32], TrustError> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| TrustError::Encode {
        what: "key confirmation",
        detail: "HMAC refused a 32-byte key".into(),
    })?;
    m.update(transcript);
    Ok(m.finalize().into_bytes().into())
}

/// Compares in constant time, so the check leaks nothing about the expected MAC.
fn mac_matches(key: &[u8; 32], transcript: &[u8; 32], got: &[u8; 32]) -> bool {
    let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(key) else {
        return false;
    };
    m.update(transcript);
    m.verify_slice(got).is_ok()
}

fn seal_with(
    key: &[u8; 32],
    domain: &[u8],
    transcript: &[u8; 32],
    plaintext: &[u8],
) -> Result<([u8; NONCE_LEN], Vec<u8>), TrustError> {
    let nonce: [u8; NONCE_LEN] = random_bytes()?;
    let ad = [domain, transcript.as_slice()].concat();
    let sealed = XChaCha20Poly1305::new(<&Key>::from(key))
        .encrypt(
            <&XNonce>::from(&nonce),
            Payload {
                msg: plaintext,
                aad: &ad,
            },
        )
        .map_err(|_| TrustError::Encode {
            what: "pairing payload",
            detail: "too long for the cipher".into(),
        })?;
    Ok((nonce, sealed))
}

fn open_with(
    key: &[u8; 32],
    domain: &[u8],
    transcript: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    sealed: &[u8],
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, TrustError> {
    let ad = [domain, transcript.as_slice()].concat();
    XChaCha20Poly1305::new(<&Key>::from(key))
        .decrypt(
            <&XNonce>::from(nonce),
            Payload {
                msg: sealed,
                aad: &ad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| TrustError::Decrypt { what })
}

/// The joining side, waiting for the issuer's Reply.
pub(crate) struct Joiner {
    spake: Spake2<Ed25519Group>,
    context: Context,
    spake_a: Vec<u8>,
    info: JoinerInfo,
}

impl Joiner {
    /// Starts pairing with the code's issuer. `info` is what the issuer learns about this
    /// device once the secret checks out. The caller must send the returned Start to
    /// `code.issuer()` over a connection authenticated as that PeerId.
    pub(crate) fn start(
        code: &InviteCode,
        joiner: &PeerId,
        info: JoinerInfo,
        now_s: u64,
    ) -> Result<(Self, Vec<u8>), TrustError> {
        if code.is_expired(now_s) {
            return Err(TrustError::InviteExpired);
        }
        if info.extra.len() > MAX_JOINER_EXTRA_LEN {
            return Err(TrustError::TooLarge {
                what: "joiner's payload",
                len: info.extra.len(),
                max: MAX_JOINER_EXTRA_LEN,
            });
        }
        let context = Context {
            code_id: code.code_id(),
            kind: code.kind(),
            home_id: code.home_id().to_string(),
            issuer: code.issuer().to_base58(),
            joiner: joiner.to_base58(),
        };
        Self::start_with(context, code.secret(), info)
    }

    /// Starts with the parts of a code; split out so tests can pair a code id with a
    /// secret that does not belong to it, as an attacker who learned the id would.
    fn start_with(
        context: Context,
        secret: &InviteSecret,
        info: JoinerInfo,
    ) -> Result<(Self, Vec<u8>), TrustError> {
        let (spake, spake_a) = Spake2::<Ed25519Group>::start_a(
            &Password::new(secret.expose_secret()),
            &Identity::new(context.joiner.as_bytes()),
            &Identity::new(context.issuer.as_bytes()),
        );
        let start = PairMessage::Start {
            version: PAIR_VERSION,
            code_id: *context.code_id.as_bytes(),
            joiner: context.joiner.clone(),
            spake: ByteBuf::from(spake_a.clone()),
        }
        .encode()?;
        Ok((
            Self {
                spake,
                context,
                spake_a,
                info,
            },
            start,
        ))
    }

    /// Takes the issuer's Reply; on success returns the Confirm to send.
    pub(crate) fn receive_reply(self, bytes: &[u8]) -> Result<(AwaitingGrant, Vec<u8>), Failure> {
        let msg = PairMessage::decode(bytes).map_err(Failure::tell)?;
        let PairMessage::Reply { spake, confirm } = msg else {
            return Err(Failure::unexpected(&msg, "Reply"));
        };
        if spake.len() != SPAKE_MSG_LEN {
            return Err(Failure::tell(malformed(
                "SPAKE2 message has the wrong length",
            )));
        }
        let key = Zeroizing::new(
            self.spake
                .finish(&spake)
                .map_err(|_| Failure::tell(malformed("SPAKE2 message does not decode")))?,
        );
        let keys = SessionKeys::derive(&key, &self.context.code_id).map_err(Failure::quiet)?;
        let th = self.context.transcript_hash(&self.spake_a, &spake);
        if !mac_matches(&keys.confirm_issuer, &th, &confirm) {
            return Err(Failure::tell(TrustError::WrongSecret));
        }
        let info = Zeroizing::new(to_cbor("joiner info", &self.info).map_err(Failure::quiet)?);
        let (nonce, sealed) =
            seal_with(&keys.seal_joiner, JOINER_AD, &th, &info).map_err(Failure::quiet)?;
        let confirm = PairMessage::Confirm {
            confirm: mac(&keys.confirm_joiner, &th).map_err(Failure::quiet)?,
            nonce,
            sealed: ByteBuf::from(sealed),
        }
        .encode()
        .map_err(Failure::quiet)?;
        Ok((AwaitingGrant { keys, th }, confirm))
    }
}

impl fmt::Debug for Joiner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Joiner")
            .field("code_id", &self.context.code_id)
            .field("issuer", &self.context.issuer)
            .finish_non_exhaustive()
    }
}

/// The joining side after key confirmation, waiting for the grant.
pub(crate) struct AwaitingGrant {
    keys: SessionKeys,
    th: [u8; 32],
}

impl AwaitingGrant {
    /// Takes the issuer's Grant and opens it.
    pub(crate) fn receive_grant(self, bytes: &[u8]) -> Result<Grant, Failure> {
        let msg = PairMessage::decode(bytes).map_err(Failure::tell)?;
        let PairMessage::Grant { nonce, sealed } = msg else {
            return Err(Failure::unexpected(&msg, "Grant"));
        };
        let plain = open_with(
            &self.keys.seal_issuer,
            GRANT_AD,
            &self.th,
            &nonce,
            &sealed,
            "pairing grant",
        )
        .map_err(Failure::tell)?;
        from_cbor("pairing grant", &plain, MAX_GRANT_LEN).map_err(Failure::tell)
    }
}

impl fmt::Debug for AwaitingGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AwaitingGrant(..)")
    }
}

/// The issuing side, waiting for the joiner's Confirm.
pub(crate) struct IssuerHandshake {
    context: Context,
    keys: SessionKeys,
    th: [u8; 32],
    joiner: PeerId,
}

impl IssuerHandshake {
    /// Takes a joiner's Start. `issuer` is this device; `remote` is the PeerId the
    /// connection was authenticated as. On success returns the Reply to send; the code has
    /// then used up one attempt.
    pub(crate) fn receive_start(
        book: &mut InviteBook,
        issuer: &PeerId,
        remote: &PeerId,
        bytes: &[u8],
        now_s: u64,
    ) -> Result<(Self, Vec<u8>), Failure> {
        let msg = PairMessage::decode(bytes).map_err(Failure::tell)?;
        let PairMessage::Start {
            version,
            code_id,
            joiner,
            spake,
        } = msg
        else {
            return Err(Failure::unexpected(&msg, "Start"));
        };
        if version != PAIR_VERSION {
            return Err(Failure {
                error: Refusal::Version.to_error(),
                reply: refusal(Refusal::Version).ok(),
            });
        }
        // The certificate will name the joiner's PeerId, so it must be the one the
        // connection proved; otherwise a device could obtain a certificate for another.
        let claimed =
            PeerId::from_str(&joiner).map_err(|_| Failure::tell(TrustError::PeerMismatch))?;
        if claimed != *remote {
            return Err(Failure::tell(TrustError::PeerMismatch));
        }
        let code_id = CodeId::from_bytes(code_id);
        let open = book.check(&code_id, now_s).map_err(Failure::tell)?;
        if spake.len() != SPAKE_MSG_LEN {
            return Err(Failure::tell(malformed(
                "SPAKE2 message has the wrong length",
            )));
        }
        let context = Context {
            code_id,
            kind: open.kind,
            home_id: open.home_id.clone(),
            issuer: issuer.to_base58(),
            joiner: remote.to_base58(),
        };
        let (spake_state, spake_b) = Spake2::<Ed25519Group>::start_b(
            &Password::new(open.secret.expose_secret()),
            &Identity::new(context.joiner.as_bytes()),
            &Identity::new(context.issuer.as_bytes()),
        );
        let key = Zeroizing::new(
            spake_state
                .finish(&spake)
                .map_err(|_| Failure::tell(malformed("SPAKE2 message does not decode")))?,
        );
        let keys = SessionKeys::derive(&key, &code_id).map_err(Failure::quiet)?;
        let th = context.transcript_hash(&spake, &spake_b);
        let reply = PairMessage::Reply {
            spake: ByteBuf::from(spake_b),
            confirm: mac(&keys.confirm_issuer, &th).map_err(Failure::quiet)?,
        }
        .encode()
        .map_err(Failure::quiet)?;
        // Counted only now, when the Reply is about to go out: a message that was refused
        // above tested no guess, so it costs the code nothing.
        book.begin_attempt(&code_id, now_s).map_err(Failure::tell)?;
        Ok((
            Self {
                context,
                keys,
                th,
                joiner: *remote,
            },
            reply,
        ))
    }

    /// Takes the joiner's Confirm. On success the joiner has proved it holds the secret;
    /// the caller issues what the grant needs and passes it to
    /// [`VerifiedJoiner::seal_grant`].
    pub(crate) fn receive_confirm(
        self,
        book: &mut InviteBook,
        bytes: &[u8],
    ) -> Result<VerifiedJoiner, Failure> {
        let code_id = self.context.code_id;
        let msg = PairMessage::decode(bytes).map_err(Failure::tell)?;
        let (confirm, nonce, sealed) = match msg {
            PairMessage::Confirm {
                confirm,
                nonce,
                sealed,
            } => (confirm, nonce, sealed),
            PairMessage::Refused {
                reason: Refusal::WrongSecret,
            } => {
                // The joiner found the mismatch first, from our MAC.
                book.attempt_failed(&code_id);
                return Err(Failure::quiet(TrustError::WrongSecret));
            }
            other => return Err(Failure::unexpected(&other, "Confirm")),
        };
        if !mac_matches(&self.keys.confirm_joiner, &self.th, &confirm) {
            book.attempt_failed(&code_id);
            return Err(Failure::tell(TrustError::WrongSecret));
        }
        let plain = open_with(
            &self.keys.seal_joiner,
            JOINER_AD,
            &self.th,
            &nonce,
            &sealed,
            "joiner info",
        )
        .map_err(Failure::tell)?;
        let info: JoinerInfo =
            from_cbor("joiner info", &plain, MAX_JOINER_INFO_LEN).map_err(Failure::tell)?;
        if info.extra.len() > MAX_JOINER_EXTRA_LEN {
            return Err(Failure::tell(TrustError::TooLarge {
                what: "joiner's payload",
                len: info.extra.len(),
                max: MAX_JOINER_EXTRA_LEN,
            }));
        }
        Ok(VerifiedJoiner {
            context: self.context,
            keys: self.keys,
            th: self.th,
            joiner: self.joiner,
            info,
        })
    }
}

impl fmt::Debug for IssuerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerHandshake")
            .field("code_id", &self.context.code_id)
            .field("joiner", &self.context.joiner)
            .finish_non_exhaustive()
    }
}

/// The issuing side once the joiner proved it holds the secret.
pub(crate) struct VerifiedJoiner {
    context: Context,
    keys: SessionKeys,
    th: [u8; 32],
    joiner: PeerId,
    info: JoinerInfo,
}

impl VerifiedJoiner {
    /// The joining device, as its connection proved.
    pub(crate) fn peer_id(&self) -> &PeerId {
        &self.joiner
    }

    /// What the code admitted the joiner to.
    pub(crate) fn kind(&self) -> InviteKind {
        self.context.kind
    }

    /// The code that was used.
    pub(crate) fn code_id(&self) -> CodeId {
        self.context.code_id
    }

    /// What the joiner said about itself (authenticated by the exchange).
    pub(crate) fn info(&self) -> &JoinerInfo {
        &self.info
    }

    /// Consumes the code and seals the grant. If the code was used or expired while this
    /// exchange ran, nothing is granted and the failure carries the refusal to send.
    pub(crate) fn seal_grant(
        self,
        book: &mut InviteBook,
        grant: &Grant,
        now_s: u64,
    ) -> Result<Vec<u8>, Failure> {
        let plain = Zeroizing::new(to_cbor("pairing grant", grant).map_err(Failure::quiet)?);
        if plain.len() > MAX_GRANT_LEN {
            return Err(Failure::tell(TrustError::TooLarge {
                what: "pairing grant",
                len: plain.len(),
                max: MAX_GRANT_LEN,
            }));
        }
        let (nonce, sealed) = seal_with(&self.keys.seal_issuer, GRANT_AD, &self.th, &plain)
            .map_err(Failure::quiet)?;
        let msg = PairMessage::Grant {
            nonce,
            sealed: ByteBuf::from(sealed),
        }
        .encode()
        .map_err(Failure::quiet)?;
        // Last, so that no failure above can use the code up without a grant going out.
        book.consume(&self.context.code_id, now_s)
            .map_err(Failure::tell)?;
        Ok(msg)
    }
}

impl fmt::Debug for VerifiedJoiner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedJoiner")
            .field("code_id", &self.context.code_id)
            .field("joiner", &self.context.joiner)
            .field("kind", &self.context.kind)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn malformed(detail: &str) -> TrustError {
    TrustError::Malformed {
        what: "pairing message",
        detail: detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::invite::tests::{NOW, issuer as issuer_of};
    use crate::trust::invite::{InviteBook, Issuer};
    use proptest::prelude::*;

    struct Setup {
        book: InviteBook,
        issuer: Issuer,
        joiner: PeerId,
        code: InviteCode,
    }

    fn setup(kind: InviteKind) -> Setup {
        let issuer = issuer_of();
        let mut book = InviteBook::default();
        let secret = random_bytes().unwrap();
        let code = book.issue(kind, &issuer, 600, NOW, secret).unwrap();
        // The joiner reads the code from text, as a person would hand it over.
        let code = InviteCode::parse(&code.encode(), NOW).unwrap();
        Setup {
            book,
            issuer,
            joiner: hearth_net::DeviceIdentity::generate().to_peer_id(),
            code,
        }
    }

    fn info() -> JoinerInfo {
        JoinerInfo {
            x25519_public: [4; 32],
            device_name: "hall speaker".into(),
            extra: ByteBuf::from(b"joining home".to_vec()),
        }
    }

    fn grant() -> Grant {
        Grant {
            certificate: ByteBuf::from(b"certificate".to_vec()),
            home: ByteBuf::from(b"home record".to_vec()),
            home_doc: ByteBuf::from(vec![7; 5000]),
        }
    }

    /// What the issuer learned about a joiner that paired.
    #[derive(Debug)]
    struct Learned {
        info: JoinerInfo,
        peer: PeerId,
        kind: InviteKind,
        code_id: CodeId,
    }

    /// Takes a failure's refusal where the other side expected a real message.
    fn refused<T>(step: Result<T, Failure>) -> Failure {
        match step {
            Ok(_) => panic!("a refusal was accepted as a real message"),
            Err(f) => f,
        }
    }

    /// Runs the whole exchange, carrying each refusal to the other side; returns what
    /// each side ends with.
    fn pair(
        s: &mut Setup,
        joiner: Joiner,
        start: Vec<u8>,
        now_s: u64,
    ) -> (Result<Grant, Failure>, Result<Learned, Failure>) {
        let issuer = s.issuer.peer_id;
        let (handshake, reply) =
            match IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, now_s) {
                Ok(step) => step,
                Err(f) => {
                    let j = refused(joiner.receive_reply(f.reply.as_ref().unwrap()));
                    return (Err(j), Err(f));
                }
            };
        let (awaiting, confirm) = match joiner.receive_reply(&reply) {
            Ok(step) => step,
            Err(f) => {
                let i = refused(handshake.receive_confirm(&mut s.book, f.reply.as_ref().unwrap()));
                return (Err(f), Err(i));
            }
        };
        let verified = match handshake.receive_confirm(&mut s.book, &confirm) {
            Ok(v) => v,
            Err(f) => {
                let j = refused(awaiting.receive_grant(f.reply.as_ref().unwrap()));
                return (Err(j), Err(f));
            }
        };
        let learned = Learned {
            info: verified.info().clone(),
            peer: *verified.peer_id(),
            kind: verified.kind(),
            code_id: verified.code_id(),
        };
        match verified.seal_grant(&mut s.book, &grant(), now_s) {
            Ok(msg) => (awaiting.receive_grant(&msg), Ok(learned)),
            Err(f) => {
                let j = refused(awaiting.receive_grant(f.reply.as_ref().unwrap()));
                (Err(j), Err(f))
            }
        }
    }

    #[test]
    fn the_right_secret_pairs_and_both_sides_agree() {
        for kind in [InviteKind::Device, InviteKind::Home] {
            let mut s = setup(kind);
            let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW + 1).unwrap();
            let (joiner_side, issuer_side) = pair(&mut s, joiner, start, NOW + 1);
            assert_eq!(joiner_side.unwrap(), grant());
            let learned = issuer_side.unwrap();
            assert_eq!(learned.info, info());
            assert_eq!(learned.peer, s.joiner);
            assert_eq!(learned.kind, kind);
            assert_eq!(learned.code_id, s.code.code_id());
            // The code is spent.
            assert_eq!(
                s.book.check(&s.code.code_id(), NOW + 2),
                Err(TrustError::InviteUsed)
            );
        }
    }

    #[test]
    fn the_secret_is_never_on_the_wire() {
        let mut s = setup(InviteKind::Device);
        let secret = *s.code.secret().expose_secret();
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let issuer = s.issuer.peer_id;
        let (handshake, reply) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, NOW).unwrap();
        let (awaiting, confirm) = joiner.receive_reply(&reply).unwrap();
        let verified = handshake.receive_confirm(&mut s.book, &confirm).unwrap();
        let canary = b"CANARY-home-document-4b1d";
        let mut g = grant();
        g.home_doc = ByteBuf::from(canary.to_vec());
        let grant_msg = verified.seal_grant(&mut s.book, &g, NOW).unwrap();
        for msg in [&start, &reply, &confirm, &grant_msg] {
            assert!(!msg.windows(8).any(|w| secret.windows(8).any(|x| x == w)));
            assert!(!msg.windows(8).any(|w| canary.windows(8).any(|x| x == w)));
            assert!(
                !msg.windows(8)
                    .any(|w| b"hall speaker".windows(8).any(|x| x == w))
            );
        }
        assert_eq!(awaiting.receive_grant(&grant_msg).unwrap(), g);
    }

    /// A joiner that knows the code id (say, from a log) but not the secret.
    fn impostor(s: &Setup) -> (Joiner, Vec<u8>) {
        let context = Context {
            code_id: s.code.code_id(),
            kind: s.code.kind(),
            home_id: s.code.home_id().to_string(),
            issuer: s.code.issuer().to_base58(),
            joiner: s.joiner.to_base58(),
        };
        Joiner::start_with(context, &InviteSecret::from_bytes([0xee; 32]), info()).unwrap()
    }

    #[test]
    fn a_wrong_secret_fails_on_both_sides_and_leaves_the_code_usable() {
        let mut s = setup(InviteKind::Device);
        let (joiner, start) = impostor(&s);
        let (joiner_side, issuer_side) = pair(&mut s, joiner, start, NOW);
        let joiner_err = joiner_side.unwrap_err().error;
        let issuer_err = issuer_side.unwrap_err().error;
        assert_eq!(joiner_err, TrustError::WrongSecret);
        assert_eq!(issuer_err, TrustError::WrongSecret);
        assert!(
            joiner_err.to_string().contains("does not match"),
            "{joiner_err}"
        );
        assert_eq!(
            s.book.attempts_left(&s.code.code_id()),
            Some(MAX_ATTEMPTS - 1)
        );

        // The rightful joiner still pairs.
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (joiner_side, issuer_side) = pair(&mut s, joiner, start, NOW);
        assert_eq!(joiner_side.unwrap(), grant());
        assert!(issuer_side.is_ok());
    }

    #[test]
    fn the_issuer_catches_a_wrong_secret_from_the_confirm_alone() {
        // A joiner that ignores the issuer's MAC and sends a Confirm anyway.
        let mut s = setup(InviteKind::Device);
        let (_, start) = impostor(&s);
        let issuer = s.issuer.peer_id;
        let (handshake, _reply) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, NOW).unwrap();
        let forged = PairMessage::Confirm {
            confirm: [1; 32],
            nonce: [2; NONCE_LEN],
            sealed: ByteBuf::from(vec![3; 64]),
        }
        .encode()
        .unwrap();
        let f = handshake.receive_confirm(&mut s.book, &forged).unwrap_err();
        assert_eq!(f.error, TrustError::WrongSecret);
        assert_eq!(
            PairMessage::decode(f.reply.as_ref().unwrap()).unwrap(),
            PairMessage::Refused {
                reason: Refusal::WrongSecret
            }
        );
    }

    #[test]
    fn three_wrong_secrets_burn_the_code() {
        let mut s = setup(InviteKind::Device);
        for _ in 0..MAX_ATTEMPTS {
            let (joiner, start) = impostor(&s);
            let (j, i) = pair(&mut s, joiner, start, NOW);
            assert_eq!(j.unwrap_err().error, TrustError::WrongSecret);
            assert_eq!(i.unwrap_err().error, TrustError::WrongSecret);
        }
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (joiner_side, issuer_side) = pair(&mut s, joiner, start, NOW);
        let burned = TrustError::InviteBurned {
            attempts: MAX_ATTEMPTS,
        };
        assert_eq!(issuer_side.unwrap_err().error, burned);
        let joiner_err = joiner_side.unwrap_err().error;
        assert_eq!(joiner_err, burned);
        assert!(joiner_err.to_string().contains("withdrawn after 3 failed"));
    }

    #[test]
    fn a_used_code_is_refused_and_changes_nothing() {
        let mut s = setup(InviteKind::Device);
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (ok, _) = pair(&mut s, joiner, start, NOW);
        assert!(ok.is_ok());

        let other = hearth_net::DeviceIdentity::generate().to_peer_id();
        s.joiner = other;
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (joiner_side, issuer_side) = pair(&mut s, joiner, start, NOW);
        assert_eq!(issuer_side.unwrap_err().error, TrustError::InviteUsed);
        let err = joiner_side.unwrap_err().error;
        assert_eq!(err, TrustError::InviteUsed);
        assert!(err.to_string().contains("already used"));
    }

    #[test]
    fn an_expired_code_is_refused_on_both_sides() {
        let mut s = setup(InviteKind::Device);
        // The joiner refuses by itself once the code has expired.
        assert_eq!(
            Joiner::start(&s.code, &s.joiner, info(), NOW + 600).unwrap_err(),
            TrustError::InviteExpired
        );
        // A joiner whose clock is behind still meets the issuer's refusal.
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (joiner_side, issuer_side) = pair(&mut s, joiner, start, NOW + 601);
        assert_eq!(issuer_side.unwrap_err().error, TrustError::InviteExpired);
        assert_eq!(joiner_side.unwrap_err().error, TrustError::InviteExpired);
        assert_eq!(s.book.attempts_left(&s.code.code_id()), Some(MAX_ATTEMPTS));
    }

    #[test]
    fn a_code_that_expires_mid_exchange_grants_nothing() {
        let mut s = setup(InviteKind::Device);
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let issuer = s.issuer.peer_id;
        let (handshake, reply) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, NOW + 599)
                .unwrap();
        let (awaiting, confirm) = joiner.receive_reply(&reply).unwrap();
        let verified = handshake.receive_confirm(&mut s.book, &confirm).unwrap();
        let f = verified
            .seal_grant(&mut s.book, &grant(), NOW + 600)
            .unwrap_err();
        assert_eq!(f.error, TrustError::InviteExpired);
        assert_eq!(
            awaiting
                .receive_grant(f.reply.as_ref().unwrap())
                .unwrap_err()
                .error,
            TrustError::InviteExpired
        );
    }

    #[test]
    fn two_joiners_racing_for_one_code_get_one_grant() {
        let mut s = setup(InviteKind::Device);
        let issuer = s.issuer.peer_id;
        let other = hearth_net::DeviceIdentity::generate().to_peer_id();
        let (ja, sa) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (jb, sb) = Joiner::start(&s.code, &other, info(), NOW).unwrap();
        let (ha, ra) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &sa, NOW).unwrap();
        let (hb, rb) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &other, &sb, NOW).unwrap();
        let (_, ca) = ja.receive_reply(&ra).unwrap();
        let (_, cb) = jb.receive_reply(&rb).unwrap();
        let va = ha.receive_confirm(&mut s.book, &ca).unwrap();
        let vb = hb.receive_confirm(&mut s.book, &cb).unwrap();
        assert!(va.seal_grant(&mut s.book, &grant(), NOW).is_ok());
        assert_eq!(
            vb.seal_grant(&mut s.book, &grant(), NOW).unwrap_err().error,
            TrustError::InviteUsed
        );
    }

    #[test]
    fn unknown_codes_and_impersonated_joiners_are_refused() {
        let mut s = setup(InviteKind::Device);
        let issuer = s.issuer.peer_id;
        let mut unknown = InviteBook::default();
        let (_, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let f = IssuerHandshake::receive_start(&mut unknown, &issuer, &s.joiner, &start, NOW)
            .unwrap_err();
        assert_eq!(f.error, TrustError::InviteUnknown);

        // The Start names one PeerId, the connection proved another.
        let someone_else = hearth_net::DeviceIdentity::generate().to_peer_id();
        let f = IssuerHandshake::receive_start(&mut s.book, &issuer, &someone_else, &start, NOW)
            .unwrap_err();
        assert_eq!(f.error, TrustError::PeerMismatch);
        assert_eq!(s.book.attempts_left(&s.code.code_id()), Some(MAX_ATTEMPTS));
    }

    #[test]
    fn a_grant_sealed_for_one_exchange_does_not_open_in_another() {
        let mut s = setup(InviteKind::Device);
        let issuer = s.issuer.peer_id;
        let (j1, s1) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (j2, s2) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let (h1, r1) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &s1, NOW).unwrap();
        let (_h2, r2) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &s2, NOW).unwrap();
        let (_a1, c1) = j1.receive_reply(&r1).unwrap();
        let (a2, _c2) = j2.receive_reply(&r2).unwrap();
        let v1 = h1.receive_confirm(&mut s.book, &c1).unwrap();
        let g1 = v1.seal_grant(&mut s.book, &grant(), NOW).unwrap();
        let f = a2.receive_grant(&g1).unwrap_err();
        assert!(
            matches!(f.error, TrustError::Decrypt { .. }),
            "{:?}",
            f.error
        );
    }

    #[test]
    fn messages_out_of_turn_are_refused() {
        let mut s = setup(InviteKind::Device);
        let issuer = s.issuer.peer_id;
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        // The joiner's own Start is not a Reply.
        let f = joiner.receive_reply(&start).unwrap_err();
        assert!(
            matches!(f.error, TrustError::Malformed { .. }),
            "{:?}",
            f.error
        );
        assert_eq!(
            PairMessage::decode(f.reply.as_ref().unwrap()).unwrap(),
            PairMessage::Refused {
                reason: Refusal::Malformed
            }
        );
        let f = IssuerHandshake::receive_start(
            &mut s.book,
            &issuer,
            &s.joiner,
            &refusal(Refusal::Failed).unwrap(),
            NOW,
        )
        .unwrap_err();
        assert!(f.reply.is_none());
        assert!(f.error.to_string().contains("could not complete"));
        let wrong_version = PairMessage::Start {
            version: 9,
            code_id: *s.code.code_id().as_bytes(),
            joiner: s.joiner.to_base58(),
            spake: ByteBuf::from(vec![0; SPAKE_MSG_LEN]),
        }
        .encode()
        .unwrap();
        let f =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &wrong_version, NOW)
                .unwrap_err();
        assert!(f.error.to_string().contains("incompatible version"));
    }

    #[test]
    fn debug_output_shows_no_secrets() {
        let mut s = setup(InviteKind::Device);
        let secret_hex = hex::encode(s.code.secret().expose_secret());
        let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
        let issuer = s.issuer.peer_id;
        let (handshake, reply) =
            IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, NOW).unwrap();
        let dbg_joiner = format!("{joiner:?}");
        let (awaiting, confirm) = joiner.receive_reply(&reply).unwrap();
        let dbg_handshake = format!("{handshake:?}");
        let verified = handshake.receive_confirm(&mut s.book, &confirm).unwrap();
        for text in [
            dbg_joiner,
            dbg_handshake,
            format!("{awaiting:?}"),
            format!("{verified:?}"),
            format!("{:?}", PairMessage::decode(&reply).unwrap()),
            format!("{:?}", grant()),
        ] {
            assert!(!text.contains(&secret_hex), "{text}");
            assert!(!text.contains("7, 7, 7"), "{text}");
        }
    }

    #[test]
    fn arbitrary_bytes_into_the_decoder_and_the_issuer_never_panic() {
        // One book for every case: the issuer faces many strangers with the same book.
        let s = std::cell::RefCell::new(setup(InviteKind::Device));
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(1024));
        runner
            .run(&proptest::collection::vec(any::<u8>(), 0..600), |bytes| {
                let _ = PairMessage::decode(&bytes);
                let mut s = s.borrow_mut();
                let (issuer, joiner) = (s.issuer.peer_id, s.joiner);
                prop_assert!(
                    IssuerHandshake::receive_start(&mut s.book, &issuer, &joiner, &bytes, NOW)
                        .is_err()
                );
                Ok(())
            })
            .unwrap();
        let s = s.into_inner();
        // None of that cost the code an attempt.
        assert_eq!(s.book.attempts_left(&s.code.code_id()), Some(MAX_ATTEMPTS));
    }

    proptest! {
        // Each case runs a few SPAKE2 steps, slow in unoptimised builds; the decoding
        // paths these cases reach are covered more widely by the test above.
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn arbitrary_bytes_into_every_later_step_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut s = setup(InviteKind::Device);
            let issuer = s.issuer.peer_id;
            let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
            let (handshake, reply) =
                IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, NOW).unwrap();
            prop_assert!(handshake.receive_confirm(&mut s.book, &bytes).is_err());

            let (joiner2, _) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
            prop_assert!(joiner2.receive_reply(&bytes).is_err());

            let (awaiting, _) = joiner.receive_reply(&reply).unwrap();
            prop_assert!(awaiting.receive_grant(&bytes).is_err());
        }

        #[test]
        fn well_framed_messages_with_arbitrary_fields_never_panic(
            spake in proptest::collection::vec(any::<u8>(), 0..40),
            mac in any::<[u8; 32]>(),
            sealed in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut s = setup(InviteKind::Device);
            let issuer = s.issuer.peer_id;
            let start = PairMessage::Start {
                version: PAIR_VERSION,
                code_id: *s.code.code_id().as_bytes(),
                joiner: s.joiner.to_base58(),
                spake: ByteBuf::from(spake.clone()),
            }.encode().unwrap();
            let _ = IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, NOW);

            let (joiner, _) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
            let reply = PairMessage::Reply { spake: ByteBuf::from(spake), confirm: mac }.encode().unwrap();
            prop_assert!(joiner.receive_reply(&reply).is_err());

            let (joiner, start) = Joiner::start(&s.code, &s.joiner, info(), NOW).unwrap();
            let (handshake, reply) = IssuerHandshake::receive_start(&mut s.book, &issuer, &s.joiner, &start, NOW).unwrap();
            let (awaiting, _) = joiner.receive_reply(&reply).unwrap();
            let confirm = PairMessage::Confirm {
                confirm: mac,
                nonce: [0; NONCE_LEN],
                sealed: ByteBuf::from(sealed.clone()),
            }.encode().unwrap();
            prop_assert!(handshake.receive_confirm(&mut s.book, &confirm).is_err());
            let g = PairMessage::Grant { nonce: [0; NONCE_LEN], sealed: ByteBuf::from(sealed) }.encode().unwrap();
            prop_assert!(awaiting.receive_grant(&g).is_err());
        }
    }
}
