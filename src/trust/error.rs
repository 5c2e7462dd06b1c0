//! The one error type of the trust module.
//!
//! Messages are written for the person at the terminal: they say what went wrong and,
//! where there is something to do, what to do. None of them ever carries key material,
//! plaintext or an invite secret, because they end up in logs and API responses.

/// Why a trust operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TrustError {
    /// Bytes from outside (a peer, the disk) do not decode as the expected record.
    #[error("{what} is malformed: {detail}")]
    Malformed {
        /// Which record.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// Bytes from outside exceed the size cap for their kind; nothing was decoded.
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Which record.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A value handed in by this node is out of range (too long a name, too many
    /// addresses, ...).
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which value.
        what: &'static str,
        /// Why it is refused.
        detail: String,
    },
    /// A record could not be encoded.
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// Which record.
        what: &'static str,
        /// The encoder's complaint.
        detail: String,
    },
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
    /// Authenticated decryption failed: the key is wrong, or the bytes were altered or
    /// belong to another document, epoch or record kind.
    #[error("cannot open {what}: wrong key, or the data was altered or belongs elsewhere")]
    Decrypt {
        /// What was being opened.
        what: &'static str,
    },
    /// A device's X25519 public key is a low-order point, so a key agreement with it
    /// would yield a predictable secret.
    #[error("the device's X25519 public key is invalid (low-order point); re-pair the device")]
    WeakDeviceKey,
    /// The text is not an invite code at all.
    #[error("this is not a Hearth invite code: {0}")]
    NotAnInvite(&'static str),
    /// The text is far longer than any invite code; it was not decoded.
    #[error(
        "this is not a Hearth invite code: it is {len} characters long, and codes have at most {max}"
    )]
    InviteTooLong {
        /// Length of the text.
        len: usize,
        /// Longest code accepted.
        max: usize,
    },
    /// The code decodes but its checksum does not match, so a character was lost or
    /// changed in copying.
    #[error("this invite code is damaged (its checksum does not match); copy the whole code again")]
    InviteDamaged,
    /// The code was made by a Hearth with a different invite format.
    #[error(
        "this invite code has format version {found}, and this Hearth reads version {supported}; \
         update Hearth on both devices"
    )]
    InviteVersion {
        /// Version in the code.
        found: u8,
        /// Version this build reads.
        supported: u8,
    },
    /// The code's expiry time has passed.
    #[error("this invite code has expired; ask for a new one with `hearth invite`")]
    InviteExpired,
    /// The code was already used to pair, and codes work once.
    #[error("this invite code was already used; ask for a new one with `hearth invite`")]
    InviteUsed,
    /// Too many wrong attempts were made with the code, so the issuer burned it.
    #[error(
        "this invite code was withdrawn after {attempts} failed pairing attempts; ask for a new one \
         with `hearth invite`"
    )]
    InviteBurned {
        /// Failed attempts that burned it.
        attempts: u8,
    },
    /// The issuer has no record of the code.
    #[error(
        "this invite code is not known to the node it names: it was withdrawn, long expired, or \
         made by another node; ask for a new one with `hearth invite`"
    )]
    InviteUnknown,
    /// The issuer already has as many open codes as it allows.
    #[error(
        "there are already {max} open invite codes; use or let some expire before making another"
    )]
    TooManyInvites {
        /// The cap.
        max: usize,
    },
    /// The key exchange completed with different keys on the two sides: the joiner's code
    /// does not match the issuer's. The secret itself is never compared or sent.
    #[error(
        "pairing failed: the invite code does not match the one the other device issued (mistyped \
         or tampered with); check the code, or ask for a new one"
    )]
    WrongSecret,
    /// The pairing peer claims to be a different device than the connection says.
    #[error("pairing refused: the joining device's PeerId does not match the connection")]
    PeerMismatch,
    /// The other side of a pairing exchange sent something out of turn, or gave up.
    #[error("pairing failed: {0}")]
    Pairing(String),
}
