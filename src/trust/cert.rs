//! Records the home root key signs: device certificates and revocations.
//!
//! Each record travels as CBOR, but its signature covers a fixed byte layout (see
//! [`Transcript`]) rebuilt from the decoded fields. The signature therefore does not depend
//! on how a CBOR encoder orders or sizes things, and a record re-encoded by another version
//! still verifies.
//!
//! Verification never panics on hostile bytes: the size cap is checked first, then the
//! fields' shape, then the home, then the signature. The outcome is a [`Verdict`], because
//! "this certificate is forged" is an answer the caller acts on, not a failure of the node.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hearth_net::PeerId;
use serde::{Deserialize, Serialize};

use super::error::TrustError;
use super::wire::{Transcript, from_cbor, to_cbor};
use crate::home::home_id_for;

/// Format version of certificates and revocations.
pub(crate) const CERT_VERSION: u8 = 1;
/// Largest encoded certificate or revocation accepted. A certificate with the longest
/// allowed name and PeerId is about 400 bytes.
pub(crate) const MAX_CERT_LEN: usize = 1024;
/// Longest device name, in bytes of UTF-8.
pub(crate) const MAX_DEVICE_NAME_LEN: usize = 64;
/// Longest PeerId text accepted. Ed25519 PeerIds are 52 characters; the margin allows
/// other key types without letting a peer send kilobytes.
pub(crate) const MAX_PEER_ID_LEN: usize = 128;
/// Longest HomeId text accepted (base58 of 16 bytes is at most 22 characters).
const MAX_HOME_ID_LEN: usize = 32;

const CERT_DOMAIN: &[u8] = b"hearth device certificate v1";
const REVOCATION_DOMAIN: &[u8] = b"hearth device revocation v1";
const ARBITER_DOMAIN: &[u8] = b"hearth lock arbiter naming v1";

/// The outcome of checking a signed record against a home's root key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict<T> {
    /// Well formed, for the expected home, and signed by its root key.
    Valid(T),
    /// Well formed and for the expected home, but the signature does not verify: forged,
    /// altered after signing, or signed by another key.
    BadSignature,
    /// The record names a different home than the root key given.
    WrongHome {
        /// HomeId of the root key the caller trusts.
        expected: String,
        /// HomeId the record claims.
        found: String,
    },
    /// The bytes do not decode, or a field is out of range.
    Malformed(String),
}

impl<T> Verdict<T> {
    /// The verified record, if the verdict is [`Verdict::Valid`].
    #[cfg(test)]
    pub(crate) fn valid(self) -> Option<T> {
        match self {
            Self::Valid(v) => Some(v),
            _ => None,
        }
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> Verdict<U> {
        match self {
            Self::Valid(v) => Verdict::Valid(f(v)),
            Self::BadSignature => Verdict::BadSignature,
            Self::WrongHome { expected, found } => Verdict::WrongHome { expected, found },
            Self::Malformed(m) => Verdict::Malformed(m),
        }
    }
}

impl<T> fmt::Display for Verdict<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Valid(_) => f.write_str("valid"),
            Self::BadSignature => {
                f.write_str("signature does not verify against the home's root key")
            }
            Self::WrongHome { expected, found } => {
                write!(f, "issued for home {found}, not for home {expected}")
            }
            Self::Malformed(m) => write!(f, "malformed: {m}"),
        }
    }
}

/// A device's membership in a home, signed by the home's root key.
///
/// Fields are private so that nothing in the node can alter a certificate after it was
/// signed or verified; read them through the accessors.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceCert {
    version: u8,
    home_id: String,
    peer_id: String,
    #[serde(with = "serde_bytes")]
    x25519_public: [u8; 32],
    device_name: String,
    issued_at_ms: u64,
    admin: bool,
    #[serde(with = "serde_bytes")]
    signature: [u8; 64],
}

impl DeviceCert {
    /// Signs a certificate for a device of the home whose root key is `root`.
    ///
    /// Refuses a PeerId that does not parse and a device name that is empty, too long or
    /// holds control characters, so that the node never issues what peers would reject.
    pub(crate) fn issue(
        root: &SigningKey,
        peer_id: &str,
        x25519_public: [u8; 32],
        device_name: &str,
        issued_at_ms: u64,
        admin: bool,
    ) -> Result<Self, TrustError> {
        check_peer_id(peer_id).map_err(|detail| TrustError::Invalid {
            what: "PeerId",
            detail,
        })?;
        check_device_name(device_name).map_err(|detail| TrustError::Invalid {
            what: "device name",
            detail,
        })?;
        let mut cert = Self {
            version: CERT_VERSION,
            home_id: home_id_for(&root.verifying_key().to_bytes()),
            peer_id: peer_id.to_string(),
            x25519_public,
            device_name: device_name.to_string(),
            issued_at_ms,
            admin,
            signature: [0; 64],
        };
        cert.signature = root.sign(&cert.signed_bytes()).to_bytes();
        Ok(cert)
    }

    /// Encodes the certificate for the hello exchange, the home document or the grant.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, TrustError> {
        to_cbor("device certificate", self)
    }

    /// Decodes a certificate without verifying it; use [`DeviceCert::verify_bytes`] for
    /// anything a peer sent.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        from_cbor("device certificate", bytes, MAX_CERT_LEN)
    }

    /// Decodes and verifies bytes from outside in one step.
    pub(crate) fn verify_bytes(bytes: &[u8], root_public: &[u8; 32]) -> Verdict<Self> {
        match Self::decode(bytes) {
            Ok(cert) => cert.verify(root_public).map(|_| ()).map(|()| cert),
            Err(e) => Verdict::Malformed(e.to_string()),
        }
    }

    /// Checks the certificate against the root public key of the home the caller trusts.
    pub(crate) fn verify(&self, root_public: &[u8; 32]) -> Verdict<&Self> {
        if self.version != CERT_VERSION {
            return Verdict::Malformed(format!(
                "certificate version {} is not supported (expected {CERT_VERSION})",
                self.version
            ));
        }
        if let Err(m) =
            check_peer_id(&self.peer_id).and_then(|()| check_device_name(&self.device_name))
        {
            return Verdict::Malformed(m);
        }
        verify_signed(
            root_public,
            &self.home_id,
            &self.signed_bytes(),
            &self.signature,
        )
        .map(|()| self)
    }

    /// The device's PeerId, as text.
    pub(crate) fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The device's X25519 public key, which document keys are wrapped for.
    pub(crate) fn x25519_public(&self) -> &[u8; 32] {
        &self.x25519_public
    }

    /// Whether the home's root key made this device its admin (the device that created
    /// the home).
    pub(crate) fn is_admin(&self) -> bool {
        self.admin
    }

    /// The name people see for the device.
    pub(crate) fn device_name(&self) -> &str {
        &self.device_name
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut t = Transcript::new(CERT_DOMAIN);
        t.u8(self.version)
            .str_field(&self.home_id)
            .str_field(&self.peer_id)
            .bytes_field(&self.x25519_public)
            .str_field(&self.device_name)
            .u64(self.issued_at_ms)
            .u8(u8::from(self.admin));
        t.finish()
    }
}

impl fmt::Debug for DeviceCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Nothing here is secret, but the signature and key bytes are noise in logs.
        f.debug_struct("DeviceCert")
            .field("home_id", &self.home_id)
            .field("peer_id", &self.peer_id)
            .field("device_name", &self.device_name)
            .field("issued_at_ms", &self.issued_at_ms)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

/// The root key's statement that a device no longer belongs to the home.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Revocation {
    version: u8,
    home_id: String,
    peer_id: String,
    revoked_at_ms: u64,
    #[serde(with = "serde_bytes")]
    signature: [u8; 64],
}

impl Revocation {
    /// Signs a revocation of `peer_id`.
    pub(crate) fn issue(
        root: &SigningKey,
        peer_id: &str,
        revoked_at_ms: u64,
    ) -> Result<Self, TrustError> {
        check_peer_id(peer_id).map_err(|detail| TrustError::Invalid {
            what: "PeerId",
            detail,
        })?;
        let mut rev = Self {
            version: CERT_VERSION,
            home_id: home_id_for(&root.verifying_key().to_bytes()),
            peer_id: peer_id.to_string(),
            revoked_at_ms,
            signature: [0; 64],
        };
        rev.signature = root.sign(&rev.signed_bytes()).to_bytes();
        Ok(rev)
    }

    /// Encodes the revocation for the home document.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, TrustError> {
        to_cbor("device revocation", self)
    }

    /// Decodes and verifies bytes from outside.
    pub(crate) fn verify_bytes(bytes: &[u8], root_public: &[u8; 32]) -> Verdict<Self> {
        match from_cbor::<Self>("device revocation", bytes, MAX_CERT_LEN) {
            Ok(rev) => rev.verify(root_public).map(|_| ()).map(|()| rev),
            Err(e) => Verdict::Malformed(e.to_string()),
        }
    }

    /// The HomeId a revocation's bytes claim, unverified: which root key to check it
    /// against. `None` when the bytes do not decode.
    pub(crate) fn claimed_home(bytes: &[u8]) -> Option<String> {
        from_cbor::<Self>("device revocation", bytes, MAX_CERT_LEN)
            .ok()
            .map(|r| r.home_id)
    }

    /// Checks the revocation against the home's root public key.
    pub(crate) fn verify(&self, root_public: &[u8; 32]) -> Verdict<&Self> {
        if self.version != CERT_VERSION {
            return Verdict::Malformed(format!(
                "revocation version {} is not supported (expected {CERT_VERSION})",
                self.version
            ));
        }
        if let Err(m) = check_peer_id(&self.peer_id) {
            return Verdict::Malformed(m);
        }
        verify_signed(
            root_public,
            &self.home_id,
            &self.signed_bytes(),
            &self.signature,
        )
        .map(|()| self)
    }

    /// The revoked device.
    pub(crate) fn peer_id(&self) -> &str {
        &self.peer_id
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut t = Transcript::new(REVOCATION_DOMAIN);
        t.u8(self.version)
            .str_field(&self.home_id)
            .str_field(&self.peer_id)
            .u64(self.revoked_at_ms);
        t.finish()
    }
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation")
            .field("home_id", &self.home_id)
            .field("peer_id", &self.peer_id)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .finish_non_exhaustive()
    }
}

/// The root key's statement that a device decides the home's locks, from naming `seq`
/// on: the highest `seq` that verifies names the arbiter (see the locks service's
/// handoff). Written into the home document, which any device can write, so only the
/// signature makes it count.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ArbiterNaming {
    version: u8,
    home_id: String,
    peer_id: String,
    seq: u64,
    named_at_ms: u64,
    #[serde(with = "serde_bytes")]
    signature: [u8; 64],
}

impl ArbiterNaming {
    /// Signs a naming of `peer_id` as the lock arbiter from `seq` on.
    pub(crate) fn issue(
        root: &SigningKey,
        peer_id: &str,
        seq: u64,
        named_at_ms: u64,
    ) -> Result<Self, TrustError> {
        check_peer_id(peer_id).map_err(|detail| TrustError::Invalid {
            what: "PeerId",
            detail,
        })?;
        let mut naming = Self {
            version: CERT_VERSION,
            home_id: home_id_for(&root.verifying_key().to_bytes()),
            peer_id: peer_id.to_string(),
            seq,
            named_at_ms,
            signature: [0; 64],
        };
        naming.signature = root.sign(&naming.signed_bytes()).to_bytes();
        Ok(naming)
    }

    /// Encodes the naming for the home document and the store.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, TrustError> {
        to_cbor("lock arbiter naming", self)
    }

    /// Decodes and verifies bytes from outside.
    pub(crate) fn verify_bytes(bytes: &[u8], root_public: &[u8; 32]) -> Verdict<Self> {
        match from_cbor::<Self>("lock arbiter naming", bytes, MAX_CERT_LEN) {
            Ok(naming) => {
                if naming.version != CERT_VERSION {
                    return Verdict::Malformed(format!(
                        "arbiter naming version {} is not supported",
                        naming.version
                    ));
                }
                if let Err(m) = check_peer_id(&naming.peer_id) {
                    return Verdict::Malformed(m);
                }
                verify_signed(
                    root_public,
                    &naming.home_id,
                    &naming.signed_bytes(),
                    &naming.signature,
                )
                .map(|()| naming)
            }
            Err(e) => Verdict::Malformed(e.to_string()),
        }
    }

    /// The named device.
    pub(crate) fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The naming's sequence number: a higher one replaces a lower one.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut t = Transcript::new(ARBITER_DOMAIN);
        t.u8(self.version)
            .str_field(&self.home_id)
            .str_field(&self.peer_id)
            .u64(self.seq)
            .u64(self.named_at_ms);
        t.finish()
    }
}

impl fmt::Debug for ArbiterNaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArbiterNaming")
            .field("peer_id", &self.peer_id)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The checks every signed record shares: the home matches the root key, then the
/// signature verifies. The home is checked first so that a record of another home is
/// reported as such rather than as a forgery.
fn verify_signed(
    root_public: &[u8; 32],
    home_id: &str,
    signed: &[u8],
    signature: &[u8; 64],
) -> Verdict<()> {
    if home_id.len() > MAX_HOME_ID_LEN {
        return Verdict::Malformed(format!("HomeId is {} characters long", home_id.len()));
    }
    let expected = home_id_for(root_public);
    if home_id != expected {
        return Verdict::WrongHome {
            expected,
            found: home_id.to_string(),
        };
    }
    let Ok(key) = VerifyingKey::from_bytes(root_public) else {
        // The root key comes from this node's own records, so this means local damage,
        // not a peer's forgery; no record can be valid under it.
        return Verdict::Malformed("the home's root public key is not a valid Ed25519 key".into());
    };
    // verify_strict also refuses small-order keys and non-canonical signatures, so no
    // second byte string can verify for the same signed content.
    match key.verify_strict(signed, &Signature::from_bytes(signature)) {
        Ok(()) => Verdict::Valid(()),
        Err(_) => Verdict::BadSignature,
    }
}

fn check_peer_id(peer_id: &str) -> Result<(), String> {
    if peer_id.len() > MAX_PEER_ID_LEN {
        return Err(format!(
            "PeerId is {} characters long, at most {MAX_PEER_ID_LEN} are allowed",
            peer_id.len()
        ));
    }
    PeerId::from_str(peer_id)
        .map(|_| ())
        .map_err(|_| "PeerId does not parse".to_string())
}

fn check_device_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("device name is empty".into());
    }
    if name.len() > MAX_DEVICE_NAME_LEN {
        return Err(format!(
            "device name is {} bytes long, at most {MAX_DEVICE_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("device name holds control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn root(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn peer() -> String {
        hearth_net::DeviceIdentity::generate().peer_id()
    }

    fn cert(root: &SigningKey, peer: &str) -> DeviceCert {
        DeviceCert::issue(
            root,
            peer,
            [9; 32],
            "kitchen tablet",
            1_763_790_000_000,
            false,
        )
        .unwrap()
    }

    #[test]
    fn an_arbiter_naming_verifies_only_under_its_home_root() {
        let r = root(3);
        let p = peer();
        let bytes = ArbiterNaming::issue(&r, &p, 7, 1)
            .unwrap()
            .encode()
            .unwrap();
        let public = r.verifying_key().to_bytes();
        let Verdict::Valid(naming) = ArbiterNaming::verify_bytes(&bytes, &public) else {
            panic!("a naming signed by the root must verify");
        };
        assert_eq!((naming.peer_id(), naming.seq()), (p.as_str(), 7));
        let other = root(4).verifying_key().to_bytes();
        assert!(matches!(
            ArbiterNaming::verify_bytes(&bytes, &other),
            Verdict::WrongHome { .. }
        ));
        // A revocation's bytes are not a naming, and a flipped byte breaks it.
        let rev = Revocation::issue(&r, &p, 1).unwrap().encode().unwrap();
        assert!(matches!(
            ArbiterNaming::verify_bytes(&rev, &public),
            Verdict::Malformed(_)
        ));
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(!matches!(
            ArbiterNaming::verify_bytes(&bad, &public),
            Verdict::Valid(_)
        ));
    }

    #[test]
    fn certificate_round_trips_and_verifies() {
        let root = root(1);
        let peer = peer();
        let c = cert(&root, &peer);
        let bytes = c.encode().unwrap();
        assert!(bytes.len() < MAX_CERT_LEN);

        let back = DeviceCert::verify_bytes(&bytes, &root.verifying_key().to_bytes())
            .valid()
            .expect("valid certificate");
        assert_eq!(back, c);
        assert_eq!(back.peer_id(), peer);
        assert_eq!(back.home_id, home_id_for(&root.verifying_key().to_bytes()));
        assert_eq!(back.x25519_public(), &[9; 32]);
        assert_eq!(back.device_name(), "kitchen tablet");
        assert_eq!(back.issued_at_ms, 1_763_790_000_000);
        assert!(!back.admin);
    }

    #[test]
    fn a_certificate_signed_by_another_root_is_rejected() {
        let home = root(1);
        let peer = peer();
        // An attacker signs a certificate that claims `home`'s HomeId with its own key.
        let mut forged = cert(&root(2), &peer);
        forged.home_id = home_id_for(&home.verifying_key().to_bytes());
        forged.signature = root(2).sign(&forged.signed_bytes()).to_bytes();
        assert_eq!(
            forged.verify(&home.verifying_key().to_bytes()),
            Verdict::BadSignature
        );
    }

    #[test]
    fn a_certificate_of_another_home_is_reported_as_such() {
        let other = root(2);
        let c = cert(&other, &peer());
        let verdict = c.verify(&root(1).verifying_key().to_bytes());
        match verdict {
            Verdict::WrongHome { expected, found } => {
                assert_eq!(expected, home_id_for(&root(1).verifying_key().to_bytes()));
                assert_eq!(found, c.home_id);
            }
            v => panic!("expected WrongHome, got {v:?}"),
        }
    }

    #[test]
    fn every_altered_field_breaks_the_signature() {
        let root = root(1);
        let public = root.verifying_key().to_bytes();
        let c = cert(&root, &peer());
        let alterations: [fn(&mut DeviceCert); 6] = [
            |c| c.peer_id = peer(),
            |c| c.x25519_public[0] ^= 1,
            |c| c.device_name.push('!'),
            |c| c.issued_at_ms += 1,
            |c| c.admin = true,
            |c| c.signature[5] ^= 0x10,
        ];
        for alter in alterations {
            let mut forged = c.clone();
            alter(&mut forged);
            assert_eq!(forged.verify(&public), Verdict::BadSignature, "{forged:?}");
        }
    }

    #[test]
    fn flipping_any_encoded_bit_never_yields_a_valid_certificate() {
        let root = root(1);
        let public = root.verifying_key().to_bytes();
        let bytes = cert(&root, &peer()).encode().unwrap();
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x01;
            assert!(
                !matches!(
                    DeviceCert::verify_bytes(&flipped, &public),
                    Verdict::Valid(_)
                ),
                "byte {i} flipped still verifies"
            );
        }
    }

    #[test]
    fn oversized_and_out_of_range_certificates_are_malformed() {
        let public = root(1).verifying_key().to_bytes();
        let big = vec![0u8; MAX_CERT_LEN + 1];
        assert!(matches!(
            DeviceCert::verify_bytes(&big, &public),
            Verdict::Malformed(m) if m.contains("more than")
        ));

        let mut c = cert(&root(1), &peer());
        c.version = 2;
        assert!(matches!(c.verify(&public), Verdict::Malformed(m) if m.contains("version")));

        let mut c = cert(&root(1), &peer());
        c.peer_id = "not a peer".into();
        assert!(matches!(c.verify(&public), Verdict::Malformed(_)));
    }

    #[test]
    fn issuing_refuses_bad_names_and_peer_ids() {
        let root = root(1);
        let p = peer();
        for name in ["", "a\nb", &"x".repeat(MAX_DEVICE_NAME_LEN + 1)] {
            let err = DeviceCert::issue(&root, &p, [0; 32], name, 0, false).unwrap_err();
            assert!(err.to_string().contains("device name"), "{err}");
        }
        let err = DeviceCert::issue(&root, "nope", [0; 32], "tv", 0, false).unwrap_err();
        assert!(err.to_string().contains("PeerId"), "{err}");
    }

    #[test]
    fn revocations_verify_and_forgeries_do_not() {
        let root = root(3);
        let public = root.verifying_key().to_bytes();
        let p = peer();
        let rev = Revocation::issue(&root, &p, 42).unwrap();
        let back = Revocation::verify_bytes(&rev.encode().unwrap(), &public)
            .valid()
            .unwrap();
        assert_eq!(back.peer_id(), p);
        assert_eq!(back.revoked_at_ms, 42);

        let mut forged = rev.clone();
        forged.revoked_at_ms = 41;
        assert_eq!(forged.verify(&public), Verdict::BadSignature);
        assert!(matches!(rev.verify(&root_of(4)), Verdict::WrongHome { .. }));
        // A certificate's signature cannot be passed off as a revocation's.
        let c = cert(&root, &p);
        let mut confused = rev.clone();
        confused.signature = c.signature;
        assert_eq!(confused.verify(&public), Verdict::BadSignature);
    }

    fn root_of(seed: u8) -> [u8; 32] {
        root(seed).verifying_key().to_bytes()
    }

    #[test]
    fn verdicts_explain_themselves() {
        let v: Verdict<()> = Verdict::WrongHome {
            expected: "A".into(),
            found: "B".into(),
        };
        assert_eq!(v.to_string(), "issued for home B, not for home A");
        assert!(Verdict::<()>::BadSignature.to_string().contains("root key"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_verify_and_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let public = root_of(1);
            prop_assert!(!matches!(DeviceCert::verify_bytes(&bytes, &public), Verdict::Valid(_)));
            prop_assert!(!matches!(Revocation::verify_bytes(&bytes, &public), Verdict::Valid(_)));
        }

        #[test]
        fn mutated_certificates_never_panic(idx in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let root = root(1);
            let mut bytes = cert(&root, &peer()).encode().unwrap();
            let i = idx.index(bytes.len());
            bytes[i] = byte;
            let cut = cut.index(bytes.len() + 1);
            let _ = DeviceCert::verify_bytes(&bytes[..cut], &root_of(1));
            let _ = DeviceCert::verify_bytes(&bytes, &root_of(1));
        }
    }
}
