//! The home this device belongs to: its root key, HomeId and the ids of its home and
//! registry documents, kept in one sealed meta record.

use ed25519_dalek::SigningKey;
use hearth_crdt::DocId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// What a device knows about its own home.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct HomeRecord {
    /// Derived from the root public key; see [`home_id_for`].
    pub(crate) home_id: String,
    /// The home's name, shown to people and to paired homes.
    pub(crate) name: String,
    /// Root Ed25519 public key.
    pub(crate) root_public: [u8; 32],
    /// Root secret key. Present only on the device that created the home (its admin); it
    /// signs device certificates, so ordinary devices never hold it.
    pub(crate) root_secret: Option<[u8; 32]>,
    /// The home document (devices, paired homes, keyring).
    pub(crate) home_doc: DocId,
    /// The registry document (entity id -> document, shares).
    pub(crate) registry_doc: DocId,
}

impl HomeRecord {
    /// A new home whose first member and admin is this device.
    pub(crate) fn create(name: &str) -> Result<Self, Error> {
        let secret: [u8; 32] = random()?;
        let root_public = SigningKey::from_bytes(&secret).verifying_key().to_bytes();
        Ok(Self {
            home_id: home_id_for(&root_public),
            name: name.to_string(),
            root_public,
            root_secret: Some(secret),
            home_doc: DocId::from_bytes(random()?),
            registry_doc: DocId::from_bytes(random()?),
        })
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        crate::records::to_json("home record", self)
    }

    /// Decodes the stored record and checks that its HomeId matches its root key, so a
    /// damaged record is caught at start rather than producing a different home.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let record: Self = crate::records::from_json("home record", bytes)?;
        if record.home_id != home_id_for(&record.root_public) {
            return Err(Error::CorruptRecord {
                what: "home record",
                detail: "HomeId does not match the root key".into(),
            });
        }
        Ok(record)
    }
}

/// A HomeId: base58 of the first 16 bytes of SHA-256 over the root public key.
pub(crate) fn home_id_for(root_public: &[u8; 32]) -> String {
    let digest = Sha256::digest(root_public);
    bs58::encode(&digest[..16]).into_string()
}

/// Random bytes from the OS.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)
        .map_err(|e| Error::Internal(format!("system random number generator failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_rejects_a_mismatched_home_id() {
        let home = HomeRecord::create("Maple Street").unwrap();
        let back = HomeRecord::decode(&home.encode().unwrap()).unwrap();
        assert_eq!(back.home_id, home.home_id);
        assert_eq!(back.registry_doc, home.registry_doc);

        let mut forged = home.clone();
        forged.root_public[0] ^= 1;
        let err = HomeRecord::decode(&forged.encode().unwrap()).err().unwrap();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(HomeRecord::decode(b"{").is_err());
    }
}
