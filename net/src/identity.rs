//! A device's long-lived libp2p identity.

use std::fmt;

use libp2p::PeerId;
use libp2p::identity::Keypair;

use crate::Error;

/// The device's Ed25519 keypair and the PeerId derived from it.
///
/// The secret half never leaves this type except through [`DeviceIdentity::to_bytes`],
/// whose output the node seals into its store.
#[derive(Clone)]
pub struct DeviceIdentity {
    keypair: Keypair,
}

impl DeviceIdentity {
    /// Generates a fresh identity from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self {
            keypair: Keypair::generate_ed25519(),
        }
    }

    /// Encodes the keypair (secret included) for sealed storage.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Only Ed25519 keypairs are ever built here, and their protobuf encoding
        // cannot fail; a failure would mean a libp2p invariant broke.
        self.keypair
            .to_protobuf_encoding()
            .unwrap_or_else(|e| unreachable!("ed25519 keypair encoding failed: {e}"))
    }

    /// Decodes bytes written by [`DeviceIdentity::to_bytes`].
    ///
    /// Rejects anything that is not an Ed25519 keypair, so a corrupt record cannot
    /// silently turn into a different identity.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let keypair = Keypair::from_protobuf_encoding(bytes)
            .map_err(|e| Error::IdentityDecode(e.to_string()))?;
        if keypair.clone().try_into_ed25519().is_err() {
            return Err(Error::IdentityDecode("key type is not Ed25519".into()));
        }
        Ok(Self { keypair })
    }

    /// The PeerId in its usual base58 text form.
    pub fn peer_id(&self) -> String {
        self.keypair.public().to_peer_id().to_base58()
    }

    /// The PeerId as the typed value the swarm and the [`crate::Handle`] use.
    pub fn to_peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The keypair the swarm authenticates with; stays inside the crate so the secret is
    /// only ever handed to libp2p's Noise handshake.
    pub(crate) fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The PeerId's raw bytes, from which Automerge actor ids are derived.
    pub fn peer_id_bytes(&self) -> Vec<u8> {
        self.keypair.public().to_peer_id().to_bytes()
    }
}

impl fmt::Debug for DeviceIdentity {
    // Never print the secret key, even in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_keeps_its_peer_id() {
        let id = DeviceIdentity::generate();
        let back = DeviceIdentity::from_bytes(&id.to_bytes()).unwrap();
        assert_eq!(id.peer_id(), back.peer_id());
        assert!(id.peer_id().starts_with("12D3KooW"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(DeviceIdentity::from_bytes(b"").is_err());
        assert!(DeviceIdentity::from_bytes(&[0xff; 64]).is_err());
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let id = DeviceIdentity::generate();
        let dbg = format!("{id:?}");
        assert!(dbg.contains(&id.peer_id()));
        assert!(!dbg.contains(&hex_of(&id.to_bytes())));
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
