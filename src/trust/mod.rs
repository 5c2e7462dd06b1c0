//! Trust and key primitives: device certificates, invite codes, the pairing exchange and
//! document keys.
//!
//! Everything here is pure logic, with no sockets and no async runtime, so that the network
//! layer can drive it and tests can run it in one thread:
//! - [`cert`]: what the home root key signs (device certificates and revocations), and the
//!   [`cert::Verdict`] of checking such a record.
//! - [`invite`]: invite codes as one line of base58, and the issuer's [`invite::InviteBook`]
//!   that makes them single-use and time-limited.
//! - [`pake`]: the pairing exchange, a SPAKE2 handshake in which the joiner proves it knows
//!   the invite secret without sending it, followed by the sealed grant.
//! - [`keys`]: document keys, sealing records under them, and wrapping them per device.
//!
//! The caller passes time in (Unix seconds or milliseconds, as each function says). Keys,
//! nonces and SPAKE2 scalars come from the operating system's generator: handing an RNG
//! through every call would only add a way to get it wrong.
//!
//! No key, plaintext or invite secret appears in a `Debug` or `Display` output or in an
//! error message; secret-holding types implement `Debug` by hand and zero their memory
//! when dropped.

pub(crate) mod cert;
pub(crate) mod error;
pub(crate) mod invite;
pub(crate) mod keys;
pub(crate) mod messages;
pub(crate) mod pake;
pub(crate) mod wire;
