//! Encryption at rest: [`Sealed`] wraps any [`Store`] and seals every value with XChaCha20-Poly1305.

use std::fmt;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, RecordKey};
use crate::keyfile::{self, KEY_LEN, StoreKey, fill_random};
use crate::keyspace::Keyspace;
use crate::store::{Batch, BatchOp, Entry, MAX_VALUE_LEN, Scan, Store, check_batch, check_sizes};

/// Version byte that starts every sealed value.
const RECORD_FORMAT: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed value adds to its plaintext: version, nonce and tag.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// Associated-data prefixes. Distinct domains keep a record's tag from ever passing as the key check, or the
/// reverse.
const RECORD_AAD_DOMAIN: &[u8] = b"hearth-store/v1/record\0";
const CHECK_AAD_DOMAIN: &[u8] = b"hearth-store/v1/key-check\0";

/// Key of the one unsealed record, in [`Keyspace::Meta`]. The leading NUL keeps it apart from readable names.
pub const META_KEY: &[u8] = b"\0hearth-store";

const META_FORMAT: u32 = 1;
const CIPHER_NAME: &str = "xchacha20poly1305";
const KDF_NAME: &str = "argon2id";
const SALT_LEN: usize = 16;
/// A meta record is a few hundred bytes; anything far bigger is damage, and is not parsed.
const MAX_META_LEN: usize = 4096;

/// Argon2id cost parameters for a passphrase-derived store key.
///
/// They are recorded in the store's meta record when it is created, and read back from there at every open,
/// so changing them later affects new stores only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Number of passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane: well above OWASP's minimum, and about a second or less on a small home
    /// server.
    pub const RECOMMENDED: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };

    /// Most memory accepted, so that a damaged meta record cannot make open allocate without bound.
    pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    /// Most passes accepted.
    pub const MAX_ITERATIONS: u32 = 64;
    /// Most lanes accepted.
    pub const MAX_PARALLELISM: u32 = 16;

    fn check(&self) -> Result<(), String> {
        let KdfParams {
            memory_kib,
            iterations,
            parallelism,
        } = *self;
        if !(1..=Self::MAX_PARALLELISM).contains(&parallelism) {
            return Err(format!(
                "Argon2 parallelism {parallelism} is outside 1..={}",
                Self::MAX_PARALLELISM
            ));
        }
        if !(1..=Self::MAX_ITERATIONS).contains(&iterations) {
            return Err(format!(
                "Argon2 iterations {iterations} is outside 1..={}",
                Self::MAX_ITERATIONS
            ));
        }
        let min_memory = 8 * parallelism;
        if !(min_memory..=Self::MAX_MEMORY_KIB).contains(&memory_kib) {
            return Err(format!(
                "Argon2 memory {memory_kib} KiB is outside {min_memory}..={} KiB",
                Self::MAX_MEMORY_KIB
            ));
        }
        Ok(())
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams::RECOMMENDED
    }
}

/// How to obtain the store key when opening a [`Sealed`] store.
pub enum Unlock<'a> {
    /// Read the key from this file, creating it (mode 0600) when the store is new.
    KeyFile(&'a Path),
    /// Derive the key from a passphrase with Argon2id. `kdf` applies when the store is new; an existing store
    /// uses the parameters recorded in it.
    Passphrase {
        /// The passphrase.
        passphrase: &'a str,
        /// Cost parameters for a new store.
        kdf: KdfParams,
    },
    /// A fresh random key that is never saved: for in-memory stores that die with the process.
    Ephemeral,
}

impl fmt::Debug for Unlock<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unlock::KeyFile(path) => f.debug_tuple("KeyFile").field(path).finish(),
            Unlock::Passphrase { kdf, .. } => f
                .debug_struct("Passphrase")
                .field("passphrase", &"<redacted>")
                .field("kdf", kdf)
                .finish(),
            Unlock::Ephemeral => f.write_str("Ephemeral"),
        }
    }
}

/// Which key source a store was created with, as recorded in its meta record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SourceKind {
    KeyFile,
    Passphrase,
    Ephemeral,
}

impl SourceKind {
    fn of(unlock: &Unlock<'_>) -> SourceKind {
        match unlock {
            Unlock::KeyFile(_) => SourceKind::KeyFile,
            Unlock::Passphrase { .. } => SourceKind::Passphrase,
            Unlock::Ephemeral => SourceKind::Ephemeral,
        }
    }

    fn tag(self) -> u8 {
        match self {
            SourceKind::KeyFile => 1,
            SourceKind::Passphrase => 2,
            SourceKind::Ephemeral => 3,
        }
    }

    fn described(self) -> &'static str {
        match self {
            SourceKind::KeyFile => "a key file",
            SourceKind::Passphrase => "a passphrase",
            SourceKind::Ephemeral => "an ephemeral in-memory key",
        }
    }

    /// What to do when a store created with `self` is opened with something else.
    fn hint(self) -> &'static str {
        match self {
            SourceKind::KeyFile => {
                "open it without a passphrase (unset HEARTH_PASSPHRASE) so that its key file is used"
            }
            SourceKind::Passphrase => {
                "set HEARTH_PASSPHRASE to the passphrase the store was created with"
            }
            SourceKind::Ephemeral => "an ephemeral store cannot be reopened; use a new data dir",
        }
    }
}

/// The unsealed meta record: everything needed to rebuild the key, and to check it, and nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaBody {
    format: u32,
    cipher: String,
    key_source: SourceKind,
    kdf: Option<KdfRecord>,
    /// Nonce and tag of an empty message sealed under the store key: opening it proves the key is right.
    check_nonce: String,
    check_tag: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfRecord {
    algorithm: String,
    version: u32,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    salt: String,
}

/// The meta record after validation.
struct Meta {
    source: SourceKind,
    kdf: Option<(KdfParams, [u8; SALT_LEN])>,
    check_nonce: [u8; NONCE_LEN],
    check_tag: [u8; TAG_LEN],
}

impl Meta {
    /// Serialises as the JSON body, a newline, and the body's SHA-256 in hex: the checksum tells bit rot apart
    /// from a wrong key.
    fn encode(&self) -> Result<Vec<u8>, Error> {
        let body = MetaBody {
            format: META_FORMAT,
            cipher: CIPHER_NAME.to_owned(),
            key_source: self.source,
            kdf: self.kdf.map(|(params, salt)| KdfRecord {
                algorithm: KDF_NAME.to_owned(),
                version: 0x13,
                memory_kib: params.memory_kib,
                iterations: params.iterations,
                parallelism: params.parallelism,
                salt: hex::encode(salt),
            }),
            check_nonce: hex::encode(self.check_nonce),
            check_tag: hex::encode(self.check_tag),
        };
        let mut out = serde_json::to_vec(&body).map_err(|e| Error::InvalidConfig {
            reason: format!("cannot encode the meta record: {e}"),
        })?;
        let digest = hex::encode(Sha256::digest(&out));
        out.push(b'\n');
        out.extend_from_slice(digest.as_bytes());
        Ok(out)
    }

    /// Parses and validates; the error says what is wrong.
    fn decode(raw: &[u8]) -> Result<Meta, String> {
        if raw.len() > MAX_META_LEN {
            return Err(format!(
                "it is {} bytes, far larger than a meta record",
                raw.len()
            ));
        }
        let split = raw
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or("it has no checksum line")?;
        let (body, digest) = (&raw[..split], &raw[split + 1..]);
        if hex::encode(Sha256::digest(body)).as_bytes() != digest {
            return Err(
                "its checksum does not match its contents (the record is damaged)".to_owned(),
            );
        }
        let body: MetaBody =
            serde_json::from_slice(body).map_err(|e| format!("it cannot be parsed ({e})"))?;
        if body.format != META_FORMAT {
            return Err(format!(
                "it has format version {}, but this build reads version {META_FORMAT}; use a matching hearth version",
                body.format
            ));
        }
        if body.cipher != CIPHER_NAME {
            return Err(format!("it names an unsupported cipher {:?}", body.cipher));
        }
        let kdf = match (body.key_source, body.kdf) {
            (SourceKind::Passphrase, Some(kdf)) => {
                if kdf.algorithm != KDF_NAME || kdf.version != 0x13 {
                    return Err(format!(
                        "it names an unsupported key derivation {:?} version {}",
                        kdf.algorithm, kdf.version
                    ));
                }
                let params = KdfParams {
                    memory_kib: kdf.memory_kib,
                    iterations: kdf.iterations,
                    parallelism: kdf.parallelism,
                };
                params.check()?;
                Some((params, decode_hex::<SALT_LEN>(&kdf.salt, "salt")?))
            }
            (SourceKind::Passphrase, None) => {
                return Err(
                    "it says a passphrase was used but holds no key derivation parameters"
                        .to_owned(),
                );
            }
            (_, Some(_)) => {
                return Err(
                    "it holds key derivation parameters for a store without a passphrase"
                        .to_owned(),
                );
            }
            (_, None) => None,
        };
        Ok(Meta {
            source: body.key_source,
            kdf,
            check_nonce: decode_hex::<NONCE_LEN>(&body.check_nonce, "check nonce")?,
            check_tag: decode_hex::<TAG_LEN>(&body.check_tag, "check tag")?,
        })
    }

    /// Associated data of the key check. It covers the KDF parameters and salt, so a meta record edited to
    /// point at other parameters fails the check instead of silently deriving another key.
    fn check_aad(source: SourceKind, kdf: Option<&(KdfParams, [u8; SALT_LEN])>) -> Vec<u8> {
        let mut aad = CHECK_AAD_DOMAIN.to_vec();
        aad.push(source.tag());
        if let Some((params, salt)) = kdf {
            aad.extend_from_slice(&params.memory_kib.to_be_bytes());
            aad.extend_from_slice(&params.iterations.to_be_bytes());
            aad.extend_from_slice(&params.parallelism.to_be_bytes());
            aad.extend_from_slice(salt);
        }
        aad
    }

    fn new(
        cipher: &XChaCha20Poly1305,
        source: SourceKind,
        kdf: Option<(KdfParams, [u8; SALT_LEN])>,
    ) -> Result<Meta, Error> {
        let mut check_nonce = [0u8; NONCE_LEN];
        fill_random(&mut check_nonce)?;
        let aad = Meta::check_aad(source, kdf.as_ref());
        let tag = cipher
            .encrypt_inout_detached(<&XNonce>::from(&check_nonce), &aad, (&mut [][..]).into())
            .map_err(|_| Error::InvalidConfig {
                reason: "cannot compute the key check".to_owned(),
            })?;
        let mut check_tag = [0u8; TAG_LEN];
        check_tag.copy_from_slice(&tag);
        Ok(Meta {
            source,
            kdf,
            check_nonce,
            check_tag,
        })
    }

    fn key_matches(&self, cipher: &XChaCha20Poly1305) -> bool {
        let aad = Meta::check_aad(self.source, self.kdf.as_ref());
        cipher
            .decrypt_inout_detached(
                <&XNonce>::from(&self.check_nonce),
                &aad,
                (&mut [][..]).into(),
                <&Tag>::from(&self.check_tag),
            )
            .is_ok()
    }
}

fn decode_hex<const N: usize>(text: &str, what: &str) -> Result<[u8; N], String> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| format!("its {what} is not {N} hex-encoded bytes"))?;
    Ok(out)
}

fn derive_key(
    passphrase: &str,
    params: KdfParams,
    salt: &[u8; SALT_LEN],
) -> Result<StoreKey, Error> {
    let invalid = |e: argon2::Error| Error::InvalidConfig {
        reason: format!("Argon2id rejected its parameters: {e}"),
    };
    let argon_params = Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(KEY_LEN),
    )
    .map_err(invalid)?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params)
        .hash_password_into(passphrase.as_bytes(), salt, out.as_mut_slice())
        .map_err(invalid)?;
    Ok(StoreKey::from_bytes(out))
}

fn cipher_for(key: &StoreKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(<&Key>::from(key.as_bytes()))
}

/// Associated data of a record: a domain, the keyspace tag and the key. The key comes last, so the encoding is
/// unambiguous without a length.
fn record_aad(keyspace: Keyspace, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(RECORD_AAD_DOMAIN.len() + 1 + key.len());
    aad.extend_from_slice(RECORD_AAD_DOMAIN);
    aad.push(keyspace.tag());
    aad.extend_from_slice(key);
    aad
}

/// A [`Store`] that seals every value before it reaches `S`.
///
/// A sealed value is `version (1) ‖ nonce (24) ‖ ciphertext ‖ tag (16)`, under XChaCha20-Poly1305 with a random
/// nonce, and its associated data binds the keyspace and the key: a value that is altered, or moved to another
/// key, fails with [`Error::Integrity`] naming that record, and every other record stays readable. Keys are
/// stored in the clear, so they must not hold secrets.
///
/// The one exception is the meta record ([`META_KEY`] in [`Keyspace::Meta`]), which holds the key source, the
/// Argon2id salt and parameters, and a key check value, none of them secret. Callers cannot read or write it.
///
/// Not detected: deleting a record, or rolling one back to an older sealed value of the same key.
pub struct Sealed<S> {
    inner: S,
    cipher: XChaCha20Poly1305,
    location: PathBuf,
}

impl<S: Store> Sealed<S> {
    /// Opens sealing over `inner`, creating the meta record (and the key file, if asked) when the store is new.
    ///
    /// `location` names the store in error messages. A wrong key or passphrase fails here with
    /// [`Error::WrongKey`], never later; a store created with another key source fails with
    /// [`Error::KeySourceMismatch`].
    pub fn open(mut inner: S, unlock: Unlock<'_>, location: &Path) -> Result<Self, Error> {
        let location = location.to_path_buf();
        let given = SourceKind::of(&unlock);
        let cipher = match inner.get(Keyspace::Meta, META_KEY)? {
            Some(raw) => {
                let meta = Meta::decode(&raw).map_err(|reason| Error::MetaCorrupt {
                    path: location.clone(),
                    reason,
                })?;
                if meta.source != given {
                    return Err(Error::KeySourceMismatch {
                        path: location,
                        created_with: meta.source.described(),
                        given: given.described(),
                        hint: meta.source.hint(),
                    });
                }
                let key = match unlock {
                    Unlock::KeyFile(path) => keyfile::load(path)?.ok_or_else(|| Error::KeyFile {
                        path: path.to_path_buf(),
                        problem: format!(
                            "it is missing, but the store at {} was created with it; restore it from your backup \
                             (the store cannot be read without it)",
                            location.display()
                        ),
                    })?,
                    Unlock::Passphrase { passphrase, .. } => match &meta.kdf {
                        Some((params, salt)) => derive_key(passphrase, *params, salt)?,
                        // decode() guarantees parameters for a passphrase store.
                        None => {
                            return Err(Error::MetaCorrupt {
                                path: location,
                                reason: "it lacks key derivation parameters".to_owned(),
                            });
                        }
                    },
                    // Matching kinds means the store was created ephemeral too; its key is gone by design.
                    Unlock::Ephemeral => {
                        return Err(Error::KeySourceMismatch {
                            path: location,
                            created_with: SourceKind::Ephemeral.described(),
                            given: SourceKind::Ephemeral.described(),
                            hint: SourceKind::Ephemeral.hint(),
                        });
                    }
                };
                let cipher = cipher_for(&key);
                if !meta.key_matches(&cipher) {
                    return Err(Error::WrongKey { path: location });
                }
                cipher
            }
            None => {
                for keyspace in Keyspace::ALL {
                    if !inner.scan(keyspace, &Scan::all().limit(1))?.is_empty() {
                        return Err(Error::MetaCorrupt {
                            path: location,
                            reason: format!(
                                "it is missing, yet the store holds records (in keyspace {keyspace})"
                            ),
                        });
                    }
                }
                let (key, kdf) = match unlock {
                    Unlock::KeyFile(path) => match keyfile::load(path)? {
                        // A key file without a store is reused: it may have been provisioned ahead, or left by
                        // a first open that crashed before writing the meta record.
                        Some(key) => (key, None),
                        None => (keyfile::create(path)?, None),
                    },
                    Unlock::Passphrase { passphrase, kdf } => {
                        if passphrase.is_empty() {
                            return Err(Error::InvalidConfig {
                                reason: "the passphrase is empty; set HEARTH_PASSPHRASE to a real passphrase, or \
                                         unset it to use a key file"
                                    .to_owned(),
                            });
                        }
                        kdf.check()
                            .map_err(|reason| Error::InvalidConfig { reason })?;
                        let mut salt = [0u8; SALT_LEN];
                        fill_random(&mut salt)?;
                        (derive_key(passphrase, kdf, &salt)?, Some((kdf, salt)))
                    }
                    Unlock::Ephemeral => (StoreKey::random()?, None),
                };
                let cipher = cipher_for(&key);
                let meta = Meta::new(&cipher, given, kdf)?;
                inner.put(Keyspace::Meta, META_KEY, &meta.encode()?)?;
                inner.flush()?;
                tracing::info!(path = %location.display(), key_source = given.described(), "created a new sealed store");
                cipher
            }
        };
        Ok(Sealed {
            inner,
            cipher,
            location,
        })
    }

    /// Seals `plaintext` as the value of `key` in `keyspace`.
    pub fn seal_record(
        &self,
        keyspace: Keyspace,
        key: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        out.push(RECORD_FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_inout_detached(
                <&XNonce>::from(&nonce),
                &record_aad(keyspace, key),
                (&mut out[1 + NONCE_LEN..]).into(),
            )
            .map_err(|_| Error::TooLarge {
                what: "value",
                len: plaintext.len(),
                max: MAX_VALUE_LEN,
            })?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens a value sealed by [`seal_record`](Self::seal_record) for the same keyspace and key.
    pub fn open_record(
        &self,
        keyspace: Keyspace,
        key: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let integrity = || Error::Integrity {
            keyspace,
            key: RecordKey::new(key),
        };
        let Some((&RECORD_FORMAT, rest)) = sealed.split_first() else {
            return Err(integrity());
        };
        let Some((nonce, rest)) = rest.split_first_chunk::<NONCE_LEN>() else {
            return Err(integrity());
        };
        let Some((ciphertext, tag)) = rest.split_last_chunk::<TAG_LEN>() else {
            return Err(integrity());
        };
        let mut plaintext = ciphertext.to_vec();
        self.cipher
            .decrypt_inout_detached(
                <&XNonce>::from(nonce),
                &record_aad(keyspace, key),
                plaintext.as_mut_slice().into(),
                <&Tag>::from(tag),
            )
            .map_err(|_| integrity())?;
        Ok(plaintext)
    }

    /// The directory (or label) this store reports in errors.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// The wrapped backend, e.g. to read raw sealed values.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Gives the wrapped backend back, e.g. to reopen it.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The wrapped backend, for tests that tamper with raw records.
    #[cfg(test)]
    pub(crate) fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

fn reject_reserved(keyspace: Keyspace, key: &[u8]) -> Result<(), Error> {
    if keyspace == Keyspace::Meta && key == META_KEY {
        return Err(Error::ReservedKey {
            key: RecordKey::new(key),
        });
    }
    Ok(())
}

impl<S: Store> Store for Sealed<S> {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        reject_reserved(keyspace, key)?;
        match self.inner.get(keyspace, key)? {
            Some(sealed) => self.open_record(keyspace, key, &sealed).map(Some),
            None => Ok(None),
        }
    }

    fn put(&mut self, keyspace: Keyspace, key: &[u8], value: &[u8]) -> Result<(), Error> {
        reject_reserved(keyspace, key)?;
        check_sizes(key, Some(value), MAX_VALUE_LEN)?;
        let sealed = self.seal_record(keyspace, key, value)?;
        self.inner.put(keyspace, key, &sealed)
    }

    fn delete(&mut self, keyspace: Keyspace, key: &[u8]) -> Result<(), Error> {
        reject_reserved(keyspace, key)?;
        self.inner.delete(keyspace, key)
    }

    fn scan(&self, keyspace: Keyspace, scan: &Scan) -> Result<Vec<Entry>, Error> {
        // The hidden meta record may take one slot of the inner scan; ask for one more so a full page stays full.
        let hides_meta = keyspace == Keyspace::Meta && scan.covers(META_KEY);
        let raw = if hides_meta {
            self.inner.scan(
                keyspace,
                &scan.with_limit(scan.max_entries().saturating_add(1)),
            )?
        } else {
            self.inner.scan(keyspace, scan)?
        };
        let mut out = Vec::with_capacity(raw.len().min(scan.max_entries()));
        for (key, sealed) in raw {
            if hides_meta && key == META_KEY {
                continue;
            }
            if out.len() == scan.max_entries() {
                break;
            }
            let value = self.open_record(keyspace, &key, &sealed)?;
            out.push((key, value));
        }
        Ok(out)
    }

    fn apply_batch(&mut self, batch: Batch) -> Result<(), Error> {
        check_batch(&batch, MAX_VALUE_LEN)?;
        for op in batch.ops() {
            let (BatchOp::Put { keyspace, key, .. } | BatchOp::Delete { keyspace, key }) = op;
            reject_reserved(*keyspace, key)?;
        }
        let mut sealed = Vec::with_capacity(batch.len());
        for op in batch.into_ops() {
            sealed.push(match op {
                BatchOp::Put {
                    keyspace,
                    key,
                    value,
                } => {
                    let value = self.seal_record(keyspace, &key, &value)?;
                    BatchOp::Put {
                        keyspace,
                        key,
                        value,
                    }
                }
                delete @ BatchOp::Delete { .. } => delete,
            });
        }
        self.inner.apply_batch(Batch::from(sealed))
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.inner.flush()
    }

    fn reopen(&mut self) -> Result<(), Error> {
        // The key stays; only the backend's files are reopened.
        self.inner.reopen()
    }
}

// The cipher holds the key; Debug must never reach it.
impl<S: fmt::Debug> fmt::Debug for Sealed<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("inner", &self.inner)
            .field("location", &self.location)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStore, SledStore};

    /// Small Argon2 costs so tests stay fast in debug builds.
    const TEST_KDF: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    fn mem() -> Sealed<MemStore> {
        Sealed::open(MemStore::new(), Unlock::Ephemeral, Path::new("<memory>")).unwrap()
    }

    fn passphrase(p: &str) -> Unlock<'_> {
        Unlock::Passphrase {
            passphrase: p,
            kdf: TEST_KDF,
        }
    }

    #[test]
    fn values_round_trip_and_are_sealed_underneath() {
        let mut store = mem();
        store.put(Keyspace::Keyring, b"k", b"plain value").unwrap();
        assert_eq!(
            store.get(Keyspace::Keyring, b"k").unwrap().as_deref(),
            Some(&b"plain value"[..])
        );
        let raw = store.inner.get(Keyspace::Keyring, b"k").unwrap().unwrap();
        assert_eq!(raw.len(), b"plain value".len() + SEAL_OVERHEAD);
        assert!(!raw.windows(5).any(|w| w == b"plain"));
        // Two seals of one value differ: the nonce is random.
        let a = store.seal_record(Keyspace::Keyring, b"k", b"x").unwrap();
        let b = store.seal_record(Keyspace::Keyring, b"k", b"x").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn bit_flip_fails_only_that_record() {
        let mut store = mem();
        store.put(Keyspace::DocChunks, b"doc-a", b"alpha").unwrap();
        store.put(Keyspace::DocChunks, b"doc-b", b"bravo").unwrap();
        store.put(Keyspace::Audit, b"doc-a", b"audit").unwrap();
        let raw = store
            .inner
            .get(Keyspace::DocChunks, b"doc-a")
            .unwrap()
            .unwrap();
        // Flip each byte position in turn: header, nonce, ciphertext and tag must all be covered.
        for i in 0..raw.len() {
            let mut flipped = raw.clone();
            flipped[i] ^= 0x01;
            store
                .inner_mut()
                .put(Keyspace::DocChunks, b"doc-a", &flipped)
                .unwrap();
            let err = store.get(Keyspace::DocChunks, b"doc-a").unwrap_err();
            match &err {
                Error::Integrity { keyspace, key } => {
                    assert_eq!(*keyspace, Keyspace::DocChunks);
                    assert_eq!(key.as_bytes(), b"doc-a");
                }
                other => panic!("expected an integrity error, got {other:?}"),
            }
            let text = err.to_string();
            assert!(text.contains("doc_chunks/\"doc-a\""), "{text}");
            assert!(!text.contains("alpha"), "{text}");
        }
        assert_eq!(
            store.get(Keyspace::DocChunks, b"doc-b").unwrap().as_deref(),
            Some(&b"bravo"[..])
        );
        assert_eq!(
            store.get(Keyspace::Audit, b"doc-a").unwrap().as_deref(),
            Some(&b"audit"[..])
        );
        // A scan stops at the damaged record and names it; paging past it reads the rest.
        let err = store.scan(Keyspace::DocChunks, &Scan::all()).unwrap_err();
        let Error::Integrity { key, .. } = err else {
            panic!("expected an integrity error")
        };
        let rest = store
            .scan(
                Keyspace::DocChunks,
                &Scan::all().after(key.as_bytes().to_vec()),
            )
            .unwrap();
        assert_eq!(rest, vec![(b"doc-b".to_vec(), b"bravo".to_vec())]);
    }

    #[test]
    fn truncated_values_are_integrity_errors() {
        let mut store = mem();
        for len in [0usize, 1, SEAL_OVERHEAD - 1] {
            store
                .inner_mut()
                .put(Keyspace::Outbox, b"short", &vec![RECORD_FORMAT; len])
                .unwrap();
            assert!(matches!(
                store.get(Keyspace::Outbox, b"short"),
                Err(Error::Integrity { .. })
            ));
        }
    }

    #[test]
    fn swapped_ciphertexts_are_detected() {
        let mut store = mem();
        store.put(Keyspace::Keyring, b"one", b"first").unwrap();
        store.put(Keyspace::Keyring, b"two", b"second").unwrap();
        store.put(Keyspace::SyncStates, b"one", b"third").unwrap();
        let one = store.inner.get(Keyspace::Keyring, b"one").unwrap().unwrap();
        let two = store.inner.get(Keyspace::Keyring, b"two").unwrap().unwrap();
        let other_space = store
            .inner
            .get(Keyspace::SyncStates, b"one")
            .unwrap()
            .unwrap();
        store
            .inner_mut()
            .put(Keyspace::Keyring, b"one", &two)
            .unwrap();
        store
            .inner_mut()
            .put(Keyspace::Keyring, b"two", &one)
            .unwrap();
        for key in [&b"one"[..], b"two"] {
            assert!(matches!(
                store.get(Keyspace::Keyring, key),
                Err(Error::Integrity { keyspace: Keyspace::Keyring, key: k }) if k.as_bytes() == key
            ));
        }
        // Same key, different keyspace: also refused.
        store
            .inner_mut()
            .put(Keyspace::Keyring, b"one", &other_space)
            .unwrap();
        assert!(matches!(
            store.get(Keyspace::Keyring, b"one"),
            Err(Error::Integrity { .. })
        ));
        assert_eq!(
            store.get(Keyspace::SyncStates, b"one").unwrap().as_deref(),
            Some(&b"third"[..])
        );
    }

    #[test]
    fn meta_record_is_hidden_and_reserved() {
        let mut store = mem();
        store
            .put(Keyspace::Meta, b"device.name", b"kitchen")
            .unwrap();
        let all = store.scan(Keyspace::Meta, &Scan::all().limit(1)).unwrap();
        assert_eq!(all, vec![(b"device.name".to_vec(), b"kitchen".to_vec())]);
        assert!(matches!(
            store.put(Keyspace::Meta, META_KEY, b"x"),
            Err(Error::ReservedKey { .. })
        ));
        assert!(matches!(
            store.get(Keyspace::Meta, META_KEY),
            Err(Error::ReservedKey { .. })
        ));
        assert!(matches!(
            store.delete(Keyspace::Meta, META_KEY),
            Err(Error::ReservedKey { .. })
        ));
        let mut batch = Batch::new();
        batch.put(Keyspace::Audit, b"a".to_vec(), b"1".to_vec());
        batch.delete(Keyspace::Meta, META_KEY.to_vec());
        assert!(matches!(
            store.apply_batch(batch),
            Err(Error::ReservedKey { .. })
        ));
        assert_eq!(store.get(Keyspace::Audit, b"a").unwrap(), None);
        // The same key in another keyspace is an ordinary key.
        store.put(Keyspace::Audit, META_KEY, b"fine").unwrap();
    }

    #[test]
    fn wrong_passphrase_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let mut store = Sealed::open(
                SledStore::open(&path, 1 << 20, false).unwrap(),
                passphrase("correct horse"),
                &path,
            )
            .unwrap();
            store.put(Keyspace::Keyring, b"k", b"v").unwrap();
            store.flush().unwrap();
        }
        let err = Sealed::open(
            SledStore::open(&path, 1 << 20, false).unwrap(),
            passphrase("wrong horse"),
            &path,
        )
        .unwrap_err();
        assert!(matches!(err, Error::WrongKey { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "wrong passphrase or key file for store at {}",
                path.display()
            )
        );
        let store = Sealed::open(
            SledStore::open(&path, 1 << 20, false).unwrap(),
            passphrase("correct horse"),
            &path,
        )
        .unwrap();
        assert_eq!(
            store.get(Keyspace::Keyring, b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }

    #[test]
    fn recorded_kdf_params_win_over_new_ones() {
        let mut inner = MemStore::new();
        {
            let store = Sealed::open(inner.clone(), passphrase("pw"), Path::new("m")).unwrap();
            inner = store.inner;
        }
        let other = KdfParams {
            memory_kib: 128,
            ..TEST_KDF
        };
        let reopened = Sealed::open(
            inner,
            Unlock::Passphrase {
                passphrase: "pw",
                kdf: other,
            },
            Path::new("m"),
        );
        assert!(reopened.is_ok());
    }

    #[test]
    fn wrong_key_file_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("store.key");
        let other_key = dir.path().join("other.key");
        let mut inner = MemStore::new();
        {
            let mut store = Sealed::open(
                inner.clone(),
                Unlock::KeyFile(&key_file),
                Path::new("/d/store"),
            )
            .unwrap();
            store.put(Keyspace::Outbox, b"k", b"v").unwrap();
            inner = store.inner;
        }
        keyfile::create(&other_key).unwrap();
        std::fs::rename(&other_key, &key_file).unwrap();
        let err =
            Sealed::open(inner, Unlock::KeyFile(&key_file), Path::new("/d/store")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "wrong passphrase or key file for store at /d/store"
        );
    }

    #[test]
    fn missing_key_file_of_existing_store_says_restore_it() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("store.key");
        let store = Sealed::open(
            MemStore::new(),
            Unlock::KeyFile(&key_file),
            Path::new("/d/store"),
        )
        .unwrap();
        std::fs::remove_file(&key_file).unwrap();
        let err = Sealed::open(
            store.inner,
            Unlock::KeyFile(&key_file),
            Path::new("/d/store"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("missing"), "{text}");
        assert!(text.contains("restore it from your backup"), "{text}");
        // It must not quietly create a new key file for a store that already has data.
        assert!(!key_file.exists());
    }

    #[test]
    fn key_source_mismatch_names_the_source_used() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("store.key");
        let by_file = Sealed::open(
            MemStore::new(),
            Unlock::KeyFile(&key_file),
            Path::new("/d/store"),
        )
        .unwrap();
        let err = Sealed::open(by_file.inner, passphrase("pw"), Path::new("/d/store")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::KeySourceMismatch { .. }));
        assert!(text.contains("was created with a key file"), "{text}");
        assert!(text.contains("unset HEARTH_PASSPHRASE"), "{text}");

        let other_key_file = dir.path().join("other.key");
        let by_pass =
            Sealed::open(MemStore::new(), passphrase("pw"), Path::new("/d/store")).unwrap();
        let err = Sealed::open(
            by_pass.inner,
            Unlock::KeyFile(&other_key_file),
            Path::new("/d/store"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("was created with a passphrase"), "{text}");
        assert!(text.contains("set HEARTH_PASSPHRASE"), "{text}");
        // Opening a passphrase store with the key-file source must not leave a stray key file.
        assert!(!other_key_file.exists());
    }

    #[test]
    fn corrupt_meta_record_says_what_is_wrong() {
        let store = Sealed::open(MemStore::new(), passphrase("pw"), Path::new("/d/store")).unwrap();
        let mut inner = store.inner;
        let raw = inner.get(Keyspace::Meta, META_KEY).unwrap().unwrap();

        let mut flipped = raw.clone();
        flipped[10] ^= 0x20;
        inner.put(Keyspace::Meta, META_KEY, &flipped).unwrap();
        let err = Sealed::open(inner.clone(), passphrase("pw"), Path::new("/d/store")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::MetaCorrupt { .. }), "{err:?}");
        assert!(text.contains("/d/store"), "{text}");
        assert!(text.contains("checksum does not match"), "{text}");
        assert!(
            text.contains("restore the data dir from a backup"),
            "{text}"
        );

        inner.put(Keyspace::Meta, META_KEY, b"garbage").unwrap();
        let err = Sealed::open(inner.clone(), passphrase("pw"), Path::new("/d/store")).unwrap_err();
        assert!(err.to_string().contains("no checksum line"), "{err}");

        // A well-formed record with absurd KDF costs must be refused before Argon2 allocates anything.
        let meta = Meta::decode(&raw).unwrap();
        let (_, salt) = meta.kdf.unwrap();
        let greedy = Meta {
            kdf: Some((
                KdfParams {
                    memory_kib: u32::MAX,
                    ..TEST_KDF
                },
                salt,
            )),
            ..meta
        };
        inner
            .put(Keyspace::Meta, META_KEY, &greedy.encode().unwrap())
            .unwrap();
        let err = Sealed::open(inner.clone(), passphrase("pw"), Path::new("/d/store")).unwrap_err();
        assert!(err.to_string().contains("Argon2 memory"), "{err}");

        inner.delete(Keyspace::Meta, META_KEY).unwrap();
        inner.put(Keyspace::Audit, b"x", b"sealed bytes").unwrap();
        let err = Sealed::open(inner, passphrase("pw"), Path::new("/d/store")).unwrap_err();
        assert!(
            err.to_string()
                .contains("is missing, yet the store holds records"),
            "{err}"
        );
    }

    #[test]
    fn edited_kdf_params_fail_the_key_check() {
        let store = Sealed::open(MemStore::new(), passphrase("pw"), Path::new("/d/store")).unwrap();
        let mut inner = store.inner;
        let meta = Meta::decode(&inner.get(Keyspace::Meta, META_KEY).unwrap().unwrap()).unwrap();
        let (params, salt) = meta.kdf.unwrap();
        let edited = Meta {
            kdf: Some((
                KdfParams {
                    iterations: params.iterations + 1,
                    ..params
                },
                salt,
            )),
            ..meta
        };
        inner
            .put(Keyspace::Meta, META_KEY, &edited.encode().unwrap())
            .unwrap();
        let err = Sealed::open(inner, passphrase("pw"), Path::new("/d/store")).unwrap_err();
        assert!(matches!(err, Error::WrongKey { .. }), "{err:?}");
    }

    #[test]
    fn empty_passphrase_and_bad_params_are_refused() {
        let err = Sealed::open(MemStore::new(), passphrase(""), Path::new("m")).unwrap_err();
        assert!(err.to_string().contains("passphrase is empty"), "{err}");
        let err = Sealed::open(
            MemStore::new(),
            Unlock::Passphrase {
                passphrase: "pw",
                kdf: KdfParams {
                    parallelism: 0,
                    ..TEST_KDF
                },
            },
            Path::new("m"),
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let store = Sealed::open(
            MemStore::new(),
            passphrase("hunter2-secret"),
            Path::new("m"),
        )
        .unwrap();
        let shown = format!("{store:?} {:?}", passphrase("hunter2-secret"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
