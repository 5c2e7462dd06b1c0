//! What the node reports about itself: per-peer lag, counts of documents and shares.

use super::*;
use hearth_crdt::DocId;

impl Core {
    pub(crate) fn sync_report(&mut self) -> SyncReport {
        let now = now_ms();
        let held: Vec<DocId> = self.keyring.ids().map(|(d, _)| d).collect();
        let mut peers: Vec<PeerLag> = self
            .peers
            .admitted
            .keys()
            .map(|peer| PeerLag {
                peer: peer.clone(),
                last_heard_ms: self.peers.heard_ago(peer, now),
                docs_behind: held
                    .iter()
                    .filter(|d| !self.engine.is_in_sync(peer, **d))
                    .count() as u64,
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let (shared_out, shared_in) = self.shared_counts();
        SyncReport {
            peers,
            documents: self.engine.documents().count() as u64,
            entities_shared_out: shared_out,
            entities_shared_in: shared_in,
            engine: self.engine.stats(),
            frames_oversized: self.counters.frames_oversized,
        }
    }

    /// Entities shared out (this home's registry entries with a grant to another home)
    /// and in (entity documents held here that another home owns).
    pub(crate) fn shared_counts(&self) -> (u64, u64) {
        let out = self
            .engine
            .registry(self.home.registry_doc)
            .map(|r| {
                r.entities
                    .values()
                    .filter(|e| e.deleted_at.is_none() && !e.shares.is_empty())
                    .count() as u64
            })
            .unwrap_or(0);
        let shared_in = self
            .engine
            .documents()
            .filter(|d| {
                self.engine.header(*d).is_ok_and(|h| {
                    h.kind == hearth_crdt::DocKind::Entity && h.owner_home != self.home.home_id
                })
            })
            .count() as u64;
        (out, shared_in)
    }
}

/// One device of this home, as the dashboard lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct DeviceInfo {
    pub(crate) peer_id: String,
    /// The name its root-signed certificate states (the record's own name when the
    /// certificate does not verify, which also marks it `verified: false`).
    pub(crate) name: String,
    /// Whether its certificate verifies under the home's root key.
    pub(crate) verified: bool,
    /// Whether the root key made it the home's admin device.
    pub(crate) admin: bool,
    /// Whether it is shut out (the signed revocation set, or the home document).
    pub(crate) revoked: bool,
    /// Whether it is the device answering.
    pub(crate) this_device: bool,
}

impl Core {
    /// This home's devices from the home document's device records only (not its
    /// keyring, which holds one entry per document), names and roles from certificates.
    pub(crate) fn devices(&self) -> Result<Vec<DeviceInfo>, Error> {
        use crate::trust::cert::{DeviceCert, Verdict};
        let records = self.engine.home_devices(self.home.home_doc).map_err(|e| {
            Error::Unavailable(format!(
                "the home document cannot be read yet ({e}); try again shortly"
            ))
        })?;
        Ok(records
            .into_iter()
            .map(|(peer, record)| {
                let cert =
                    match DeviceCert::verify_bytes(&record.certificate, &self.home.root_public) {
                        Verdict::Valid(cert) if cert.peer_id() == peer => Some(cert),
                        _ => None,
                    };
                DeviceInfo {
                    name: cert
                        .as_ref()
                        .map_or(record.name.clone(), |c| c.device_name().to_string()),
                    verified: cert.is_some(),
                    admin: cert.as_ref().is_some_and(|c| c.is_admin()),
                    revoked: self.is_revoked(&peer),
                    this_device: peer == self.peer_id,
                    peer_id: peer,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::core::NodeRequest;
    use crate::core::testing::TestCore;

    /// A new home lists its first device: named by its certificate, the admin, this device.
    #[tokio::test]
    async fn a_new_home_lists_its_first_device_as_admin() {
        let t = TestCore::start("hall").await;
        let devices = t
            .core
            .call(|reply| NodeRequest::Devices { reply })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(devices.len(), 1, "{devices:?}");
        let d = &devices[0];
        assert_eq!(d.peer_id, t.peer_id);
        assert_eq!(d.name, "hall");
        assert!(
            d.verified && d.admin && d.this_device && !d.revoked,
            "{d:?}"
        );
        t.stop().await;
    }
}
