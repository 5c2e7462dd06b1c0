//! Document keys: sealing records under them, and wrapping them for each member device.
//!
//! A document key is 32 random bytes, one per (document, epoch). Sealed records are
//! `version ‖ nonce (24) ‖ ciphertext ‖ tag (16)` under XChaCha20-Poly1305, whose extended
//! nonce makes random nonces safe. The associated data binds the doc id, the epoch and the
//! record kind, so a record cannot be replayed into another document, epoch or role.
//!
//! A key is wrapped for a device by an ephemeral X25519 agreement with the device's public
//! key. The raw agreement output is never a key: it goes through HKDF-SHA256 (info
//! `hearth grant v1`, salt = doc id ‖ epoch), and the result seals the document key.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hearth_crdt::{DocId, KeyEpoch};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::error::TrustError;
use super::wire::random_bytes;

/// Length of a document key.
pub(crate) const DOC_KEY_LEN: usize = 32;
/// Length of an XChaCha20-Poly1305 nonce.
pub(crate) const NONCE_LEN: usize = 24;
/// Length of a Poly1305 tag.
pub(crate) const TAG_LEN: usize = 16;
/// Bytes a sealed record adds to its plaintext.
pub(crate) const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// Length of an encoded [`WrappedKey`].
pub(crate) const WRAPPED_KEY_LEN: usize = 1 + 32 + NONCE_LEN + DOC_KEY_LEN + TAG_LEN;

/// Leading byte of sealed records, so a future format can be told apart.
const SEAL_VERSION: u8 = 1;
/// Leading byte of wrapped keys.
const WRAP_VERSION: u8 = 1;
const SEAL_AD_DOMAIN: &[u8] = b"hearth seal v1";
const GRANT_INFO: &[u8] = b"hearth grant v1";

/// A document key. Zeroed on drop; its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct DocKey(Zeroizing<[u8; DOC_KEY_LEN]>);

impl DocKey {
    /// A fresh key from the operating system's generator.
    pub(crate) fn generate() -> Result<Self, TrustError> {
        Ok(Self(Zeroizing::new(random_bytes()?)))
    }

    /// Wraps key bytes read back from the (sealed) keyring.
    pub(crate) fn from_bytes(bytes: [u8; DOC_KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw key, for the keyring to store sealed. Named so that every use is easy to
    /// find in review.
    pub(crate) fn expose_secret(&self) -> &[u8; DOC_KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(<&Key>::from(&*self.0))
    }
}

impl fmt::Debug for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DocKey(..)")
    }
}

/// What a sealed record is, bound into its associated data so that one kind can never be
/// opened as another (a stored chunk replayed as a live push, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RecordKind {
    /// A direct change push on the sync stream.
    Push,
    /// An Automerge sync message on the sync stream.
    SyncMessage,
}

impl RecordKind {
    /// Stable tag: these values are part of the sealed format and never change.
    fn tag(self) -> u8 {
        match self {
            Self::Push => 1,
            Self::SyncMessage => 2,
        }
    }
}

/// Seals `plaintext` under a document key, with a fresh random nonce.
pub(crate) fn seal(
    key: &DocKey,
    doc: DocId,
    epoch: KeyEpoch,
    kind: RecordKind,
    plaintext: &[u8],
) -> Result<Vec<u8>, TrustError> {
    let nonce: [u8; NONCE_LEN] = random_bytes()?;
    let ad = seal_ad(doc, epoch, kind);
    let ciphertext = key
        .cipher()
        .encrypt(
            <&XNonce>::from(&nonce),
            Payload {
                msg: plaintext,
                aad: &ad,
            },
        )
        // Only a plaintext beyond XChaCha20's 256 GiB limit makes this fail.
        .map_err(|_| TrustError::Encode {
            what: "sealed record",
            detail: "plaintext too long for the cipher".into(),
        })?;
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.push(SEAL_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Opens a record made by [`seal`] with the same key, doc id, epoch and kind.
///
/// Fails without detail on any mismatch: telling an attacker which check failed would
/// only help them.
pub(crate) fn open(
    key: &DocKey,
    doc: DocId,
    epoch: KeyEpoch,
    kind: RecordKind,
    sealed: &[u8],
) -> Result<Vec<u8>, TrustError> {
    let Some((&version, rest)) = sealed.split_first() else {
        return Err(too_short(sealed.len()));
    };
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(too_short(sealed.len()));
    }
    if version != SEAL_VERSION {
        return Err(TrustError::Malformed {
            what: "sealed record",
            detail: format!("format version {version} is not supported (expected {SEAL_VERSION})"),
        });
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| too_short(sealed.len()))?;
    let ad = seal_ad(doc, epoch, kind);
    key.cipher()
        .decrypt(
            <&XNonce>::from(&nonce),
            Payload {
                msg: ciphertext,
                aad: &ad,
            },
        )
        .map_err(|_| TrustError::Decrypt {
            what: "sealed record",
        })
}

fn too_short(len: usize) -> TrustError {
    TrustError::Malformed {
        what: "sealed record",
        detail: format!("{len} bytes is shorter than the {SEAL_OVERHEAD} bytes of overhead"),
    }
}

fn seal_ad(doc: DocId, epoch: KeyEpoch, kind: RecordKind) -> Vec<u8> {
    let mut ad = Vec::with_capacity(SEAL_AD_DOMAIN.len() + 16 + 24 + 1);
    ad.extend_from_slice(SEAL_AD_DOMAIN);
    ad.extend_from_slice(doc.as_bytes());
    ad.extend_from_slice(&epoch_bytes(epoch));
    ad.push(kind.tag());
    ad
}

/// The epoch as fixed bytes: counter (big-endian) then the device that started it.
fn epoch_bytes(epoch: KeyEpoch) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&epoch.counter.to_be_bytes());
    out[8..].copy_from_slice(&epoch.device);
    out
}

/// A device's X25519 secret, for receiving wrapped keys. The node keeps it sealed in its
/// store next to the libp2p identity.
pub(crate) struct DeviceSecret(StaticSecret);

impl DeviceSecret {
    /// A fresh secret from the operating system's generator.
    pub(crate) fn generate() -> Self {
        Self(StaticSecret::random())
    }

    /// Restores a secret read back from the store.
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        let bytes = Zeroizing::new(bytes);
        Self(StaticSecret::from(*bytes))
    }

    /// The secret bytes, for the store to seal.
    pub(crate) fn expose_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half, which goes into the device's certificate.
    pub(crate) fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
}

impl fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSecret")
            .field("public", &bs58::encode(self.public()).into_string())
            .finish_non_exhaustive()
    }
}

/// A document key wrapped for one device. Nothing in it is secret without the device's
/// X25519 secret.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct WrappedKey {
    ephemeral_public: [u8; 32],
    nonce: [u8; NONCE_LEN],
    ciphertext: [u8; DOC_KEY_LEN + TAG_LEN],
}

impl WrappedKey {
    /// Fixed-size encoding for the home document's keyring.
    pub(crate) fn to_bytes(&self) -> [u8; WRAPPED_KEY_LEN] {
        let mut out = [0u8; WRAPPED_KEY_LEN];
        out[0] = WRAP_VERSION;
        out[1..33].copy_from_slice(&self.ephemeral_public);
        out[33..33 + NONCE_LEN].copy_from_slice(&self.nonce);
        out[33 + NONCE_LEN..].copy_from_slice(&self.ciphertext);
        out
    }

    /// Decodes bytes from the keyring, which peers write.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() != WRAPPED_KEY_LEN {
            return Err(TrustError::Malformed {
                what: "wrapped key",
                detail: format!("{} bytes, expected {WRAPPED_KEY_LEN}", bytes.len()),
            });
        }
        if bytes[0] != WRAP_VERSION {
            return Err(TrustError::Malformed {
                what: "wrapped key",
                detail: format!(
                    "format version {} is not supported (expected {WRAP_VERSION})",
                    bytes[0]
                ),
            });
        }
        let mut out = Self {
            ephemeral_public: [0; 32],
            nonce: [0; NONCE_LEN],
            ciphertext: [0; DOC_KEY_LEN + TAG_LEN],
        };
        out.ephemeral_public.copy_from_slice(&bytes[1..33]);
        out.nonce.copy_from_slice(&bytes[33..33 + NONCE_LEN]);
        out.ciphertext.copy_from_slice(&bytes[33 + NONCE_LEN..]);
        Ok(out)
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrappedKey(..)")
    }
}

/// Wraps a document key for the device whose X25519 public key is `device_public`.
pub(crate) fn wrap_key(
    key: &DocKey,
    doc: DocId,
    epoch: KeyEpoch,
    device_public: &[u8; 32],
) -> Result<WrappedKey, TrustError> {
    let device_public = PublicKey::from(*device_public);
    let ephemeral = EphemeralSecret::random();
    let ephemeral_public = PublicKey::from(&ephemeral).to_bytes();
    let shared = ephemeral.diffie_hellman(&device_public);
    // A low-order device key makes the shared secret a constant anyone can compute.
    if !shared.was_contributory() {
        return Err(TrustError::WeakDeviceKey);
    }
    let wrap_key = grant_key(shared.as_bytes(), doc, epoch)?;
    let nonce: [u8; NONCE_LEN] = random_bytes()?;
    let ad = wrap_ad(doc, epoch, &ephemeral_public, device_public.as_bytes());
    let sealed = XChaCha20Poly1305::new(<&Key>::from(&*wrap_key))
        .encrypt(
            <&XNonce>::from(&nonce),
            Payload {
                msg: key.expose_secret(),
                aad: &ad,
            },
        )
        .map_err(|_| TrustError::Encode {
            what: "wrapped key",
            detail: "the cipher refused a 32-byte key".into(),
        })?;
    let mut ciphertext = [0u8; DOC_KEY_LEN + TAG_LEN];
    if sealed.len() != ciphertext.len() {
        return Err(TrustError::Encode {
            what: "wrapped key",
            detail: format!("cipher produced {} bytes", sealed.len()),
        });
    }
    ciphertext.copy_from_slice(&sealed);
    Ok(WrappedKey {
        ephemeral_public,
        nonce,
        ciphertext,
    })
}

/// Recovers a document key wrapped for this device.
pub(crate) fn unwrap_key(
    wrapped: &WrappedKey,
    doc: DocId,
    epoch: KeyEpoch,
    device: &DeviceSecret,
) -> Result<DocKey, TrustError> {
    let ephemeral_public = PublicKey::from(wrapped.ephemeral_public);
    let shared = device.0.diffie_hellman(&ephemeral_public);
    if !shared.was_contributory() {
        return Err(TrustError::Decrypt {
            what: "wrapped key",
        });
    }
    let wrap_key = grant_key(shared.as_bytes(), doc, epoch)?;
    let ad = wrap_ad(doc, epoch, &wrapped.ephemeral_public, &device.public());
    let plain = Zeroizing::new(
        XChaCha20Poly1305::new(<&Key>::from(&*wrap_key))
            .decrypt(
                <&XNonce>::from(&wrapped.nonce),
                Payload {
                    msg: &wrapped.ciphertext,
                    aad: &ad,
                },
            )
            .map_err(|_| TrustError::Decrypt {
                what: "wrapped key",
            })?,
    );
    let bytes: [u8; DOC_KEY_LEN] =
        plain
            .as_slice()
            .try_into()
            .map_err(|_| TrustError::Decrypt {
                what: "wrapped key",
            })?;
    Ok(DocKey::from_bytes(bytes))
}

/// HKDF-SHA256 over the agreement output, salted with the doc id and epoch so that one
/// agreement can never yield the same wrapping key for two documents.
fn grant_key(
    shared: &[u8; 32],
    doc: DocId,
    epoch: KeyEpoch,
) -> Result<Zeroizing<[u8; 32]>, TrustError> {
    let mut salt = [0u8; 16 + 24];
    salt[..16].copy_from_slice(doc.as_bytes());
    salt[16..].copy_from_slice(&epoch_bytes(epoch));
    let mut out = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(GRANT_INFO, out.as_mut())
        .map_err(|_| TrustError::Encode {
            what: "wrapping key",
            detail: "HKDF refused a 32-byte output".into(),
        })?;
    Ok(out)
}

/// The associated data of a wrapped key binds both public keys as well as the doc id and
/// epoch, so a wrapped key cannot be moved to another recipient or document.
fn wrap_ad(
    doc: DocId,
    epoch: KeyEpoch,
    ephemeral_public: &[u8; 32],
    device_public: &[u8; 32],
) -> Vec<u8> {
    let mut ad = Vec::with_capacity(GRANT_INFO.len() + 16 + 24 + 64);
    ad.extend_from_slice(GRANT_INFO);
    ad.extend_from_slice(doc.as_bytes());
    ad.extend_from_slice(&epoch_bytes(epoch));
    ad.extend_from_slice(ephemeral_public);
    ad.extend_from_slice(device_public);
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8) -> DocId {
        DocId::from_bytes([n; 16])
    }

    fn epoch(counter: u64) -> KeyEpoch {
        KeyEpoch {
            counter,
            device: [3; 16],
        }
    }

    #[test]
    fn seal_open_round_trip_and_canary_is_hidden() {
        let key = DocKey::generate().unwrap();
        let canary = b"CANARY-light.porch-on-7f3a9c";
        let sealed = seal(&key, doc(1), epoch(0), RecordKind::Push, canary).unwrap();
        assert_eq!(sealed.len(), canary.len() + SEAL_OVERHEAD);
        assert!(
            !sealed.windows(8).any(|w| canary.windows(8).any(|c| c == w)),
            "plaintext leaked into the sealed bytes"
        );
        let opened = open(&key, doc(1), epoch(0), RecordKind::Push, &sealed).unwrap();
        assert_eq!(opened, canary);

        // Two seals of the same plaintext differ: the nonce is fresh each time.
        let again = seal(&key, doc(1), epoch(0), RecordKind::Push, canary).unwrap();
        assert_ne!(sealed, again);
    }

    #[test]
    fn any_mismatch_refuses_to_open() {
        let key = DocKey::generate().unwrap();
        let sealed = seal(&key, doc(1), epoch(2), RecordKind::SyncMessage, b"state").unwrap();
        let decrypt_err = TrustError::Decrypt {
            what: "sealed record",
        };

        assert_eq!(
            open(&key, doc(2), epoch(2), RecordKind::SyncMessage, &sealed),
            Err(decrypt_err.clone()),
            "wrong doc id"
        );
        assert_eq!(
            open(&key, doc(1), epoch(3), RecordKind::SyncMessage, &sealed),
            Err(decrypt_err.clone()),
            "wrong epoch counter"
        );
        let other_device = KeyEpoch {
            counter: 2,
            device: [4; 16],
        };
        assert_eq!(
            open(&key, doc(1), other_device, RecordKind::SyncMessage, &sealed),
            Err(decrypt_err.clone()),
            "wrong epoch device"
        );
        assert_eq!(
            open(&key, doc(1), epoch(2), RecordKind::Push, &sealed),
            Err(decrypt_err.clone()),
            "wrong kind"
        );
        let other_key = DocKey::generate().unwrap();
        assert_eq!(
            open(
                &other_key,
                doc(1),
                epoch(2),
                RecordKind::SyncMessage,
                &sealed
            ),
            Err(decrypt_err.clone()),
            "wrong key"
        );
        for i in 1..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x80;
            assert_eq!(
                open(&key, doc(1), epoch(2), RecordKind::SyncMessage, &tampered),
                Err(decrypt_err.clone()),
                "byte {i} flipped"
            );
        }
        let mut wrong_version = sealed.clone();
        wrong_version[0] = 9;
        assert!(matches!(
            open(
                &key,
                doc(1),
                epoch(2),
                RecordKind::SyncMessage,
                &wrong_version
            ),
            Err(TrustError::Malformed { .. })
        ));
        for len in 0..SEAL_OVERHEAD {
            assert!(matches!(
                open(
                    &key,
                    doc(1),
                    epoch(2),
                    RecordKind::SyncMessage,
                    &sealed[..len]
                ),
                Err(TrustError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn an_empty_plaintext_still_authenticates() {
        let key = DocKey::generate().unwrap();
        let sealed = seal(&key, doc(1), epoch(0), RecordKind::SyncMessage, b"").unwrap();
        assert_eq!(
            open(&key, doc(1), epoch(0), RecordKind::SyncMessage, &sealed).unwrap(),
            b""
        );
        assert!(open(&key, doc(1), epoch(0), RecordKind::Push, &sealed).is_err());
    }

    #[test]
    fn wrapped_keys_open_only_for_their_device_document_and_epoch() {
        let key = DocKey::generate().unwrap();
        let device = DeviceSecret::generate();
        let other = DeviceSecret::generate();
        let wrapped = wrap_key(&key, doc(1), epoch(0), &device.public()).unwrap();

        let encoded = wrapped.to_bytes();
        let back = WrappedKey::from_bytes(&encoded).unwrap();
        assert_eq!(back, wrapped);
        assert!(
            !encoded
                .windows(8)
                .any(|w| key.expose_secret().windows(8).any(|k| k == w)),
            "document key visible in the wrapped bytes"
        );

        let unwrapped = unwrap_key(&back, doc(1), epoch(0), &device).unwrap();
        assert_eq!(unwrapped, key);

        let err = TrustError::Decrypt {
            what: "wrapped key",
        };
        assert_eq!(
            unwrap_key(&back, doc(1), epoch(0), &other),
            Err(err.clone())
        );
        assert_eq!(
            unwrap_key(&back, doc(2), epoch(0), &device),
            Err(err.clone())
        );
        assert_eq!(
            unwrap_key(&back, doc(1), epoch(1), &device),
            Err(err.clone())
        );

        let mut tampered = encoded;
        tampered[WRAPPED_KEY_LEN - 1] ^= 1;
        let tampered = WrappedKey::from_bytes(&tampered).unwrap();
        assert_eq!(unwrap_key(&tampered, doc(1), epoch(0), &device), Err(err));
    }

    #[test]
    fn a_device_secret_survives_its_round_trip_through_storage() {
        let device = DeviceSecret::generate();
        let restored = DeviceSecret::from_bytes(*device.expose_secret());
        assert_eq!(restored.public(), device.public());
        let key = DocKey::generate().unwrap();
        let wrapped = wrap_key(&key, doc(1), epoch(0), &device.public()).unwrap();
        assert_eq!(
            unwrap_key(&wrapped, doc(1), epoch(0), &restored).unwrap(),
            key
        );
    }

    #[test]
    fn low_order_device_keys_are_refused() {
        let key = DocKey::generate().unwrap();
        // The identity point and other small-order points give an all-zero agreement.
        assert_eq!(
            wrap_key(&key, doc(1), epoch(0), &[0; 32]),
            Err(TrustError::WeakDeviceKey)
        );
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(
            wrap_key(&key, doc(1), epoch(0), &one),
            Err(TrustError::WeakDeviceKey)
        );
    }

    #[test]
    fn malformed_wrapped_keys_are_errors() {
        assert!(WrappedKey::from_bytes(&[]).is_err());
        assert!(WrappedKey::from_bytes(&[WRAP_VERSION; WRAPPED_KEY_LEN - 1]).is_err());
        assert!(WrappedKey::from_bytes(&[9; WRAPPED_KEY_LEN]).is_err());
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let key = DocKey::from_bytes([0xab; 32]);
        let device = DeviceSecret::from_bytes([0xcd; 32]);
        let wrapped = wrap_key(&key, doc(1), epoch(0), &device.public()).unwrap();
        for text in [
            format!("{key:?}"),
            format!("{device:?}"),
            format!("{wrapped:?}"),
        ] {
            assert!(!text.contains("ab, ab") && !text.contains("171"), "{text}");
            assert!(!text.contains("cd, cd") && !text.contains("205"), "{text}");
        }
        assert_eq!(format!("{key:?}"), "DocKey(..)");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_open_and_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let key = DocKey::from_bytes([7; 32]);
            proptest::prop_assert!(open(&key, doc(1), epoch(0), RecordKind::Push, &bytes).is_err());
            if let Ok(w) = WrappedKey::from_bytes(&bytes) {
                proptest::prop_assert!(unwrap_key(&w, doc(1), epoch(0), &DeviceSecret::from_bytes([1; 32])).is_err());
            }
        }
    }
}
