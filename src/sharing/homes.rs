//! Home pairing, both sides: the code exchange, recording a paired home, forgetting one.

use super::service::*;
use crate::Error;
use crate::core::effects::Effects;
use crate::core::{Core, Reply, doc_err, now_ms};
use crate::shares::PairedWith;
use crate::trust::cert::{DeviceCert, Verdict};
use crate::trust::invite::{InviteCode, InviteKind};
use crate::trust::pake::JoinerInfo;
use crate::trust::wire::{from_cbor, to_cbor};
use hearth_crdt::schema::home as home_schema;
use hearth_net::PeerId;
use hearth_storage::{Batch, Keyspace};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;

impl Core {
    /// After the home document changed: when it lists a home it did not before, the
    /// peers the network refused as strangers (a device of that home, say, heard before
    /// the pairing reached this device) are dialled again at once, not after their
    /// cooldown.
    pub(crate) fn on_home_doc_changed(&mut self) {
        let paired: std::collections::BTreeSet<String> = self.paired().into_keys().collect();
        let grew = paired
            .iter()
            .any(|home| !self.sharing.paired_seen.contains(home));
        self.sharing.paired_seen = paired;
        if !grew {
            return;
        }
        let net = self.net.clone();
        tokio::spawn(async move {
            match net.retry_rejected().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(peers = n, "a home was paired: redialling refused peers"),
                Err(error) => tracing::debug!(%error, "cannot redial refused peers"),
            }
        });
    }

    pub(crate) fn my_public(&self) -> HomePublic {
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, d)| d.revoked_at.is_none())
            .map(|(p, d)| (p, ByteBuf::from(d.certificate)))
            .collect();
        HomePublic {
            home_id: self.home.home_id.clone(),
            name: self.home.name.clone(),
            root_public: self.home.root_public,
            devices,
        }
    }

    /// Joining side of home pairing: starts the exchange with the code's issuer in a task
    /// of its own (it waits on the network), which reports back with
    /// [`crate::sharing::service::SharingRequest::HomePairDone`].
    pub(crate) fn start_home_pairing(&mut self, code: &str, reply: Reply<PairedWith>) {
        let now_s = now_ms() / 1000;
        let code = match InviteCode::parse(code, now_s) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(Error::Pairing(e.to_string())));
                return;
            }
        };
        if code.kind() != InviteKind::Home {
            let _ = reply.send(Err(Error::Invalid(
                "this is a device code: join a new device with `hearth join CODE --data DIR` while no node runs there".into(),
            )));
            return;
        }
        if code.home_id() == self.home.home_id {
            let _ = reply.send(Err(Error::Invalid(
                "this code was issued by this home itself".into(),
            )));
            return;
        }
        if self.paired().contains_key(code.home_id()) {
            let _ = reply.send(Err(Error::Conflict(format!(
                "already paired with home {}",
                code.home_id()
            ))));
            return;
        }
        let Some(tx) = self.self_tx.clone() else {
            let _ = reply.send(Err(Error::Internal("the core cannot reach itself".into())));
            return;
        };
        let issuer = *code.issuer();
        let issuer_addrs = code.addrs().to_vec();
        self.sharing.pairing_with.insert(issuer);
        let info = JoinerInfo {
            x25519_public: self.device.public(),
            device_name: self.device_name.clone(),
            extra: ByteBuf::from(to_cbor("home record", &self.my_public()).unwrap_or_default()),
        };
        let net = self.net.clone();
        let me = self.net.local_peer_id();
        tokio::spawn(async move {
            let result = crate::pairing::join::exchange_with_issuer(&net, &code, &me, info)
                .await
                .map(|grant| grant.home.to_vec());
            let _ = tx
                .send(
                    crate::sharing::service::SharingRequest::HomePairDone {
                        issuer,
                        issuer_addrs,
                        expected_home: code.home_id().to_string(),
                        result,
                        reply,
                    }
                    .into(),
                )
                .await;
        });
    }

    /// Records the issuer's home once the exchange succeeded.
    pub(crate) async fn finish_home_pairing(
        &mut self,
        issuer: PeerId,
        issuer_addrs: &[String],
        expected_home: &str,
        result: Result<Vec<u8>, Error>,
    ) -> Result<PairedWith, Error> {
        self.sharing.pairing_with.remove(&issuer);
        let home_bytes = result?;
        let public: HomePublic = from_cbor("home record", &home_bytes, MAX_HOME_RECORD)
            .map_err(|e| Error::Pairing(format!("the other home's record is malformed: {e}")))?;
        if public.home_id != expected_home {
            return Err(Error::Pairing(
                "the other home's record names another home than the code".into(),
            ));
        }
        let paired = self
            .record_paired_home(&public, &issuer.to_base58())
            .await?;
        self.keep_dialled(issuer, issuer_addrs).await;
        self.readmit(issuer).await;
        Ok(paired)
    }

    /// Issuing side of home pairing, once the joining home proved the code: records it and
    /// returns this home's public record for the grant.
    pub(crate) async fn grant_home(
        &mut self,
        joiner: &str,
        extra: &[u8],
    ) -> Result<Vec<u8>, String> {
        let public: HomePublic = from_cbor("home record", extra, MAX_HOME_RECORD)
            .map_err(|e| format!("the joining home's record is malformed: {e}"))?;
        if public.home_id == self.home.home_id {
            return Err("a home cannot pair with itself".into());
        }
        self.record_paired_home(&public, joiner)
            .await
            .map_err(|e| e.to_string())?;
        to_cbor("home record", &self.my_public()).map_err(|e| e.to_string())
    }

    /// Called after the grant went out: admits the joining home's device that paired.
    pub(crate) async fn after_home_granted(&mut self, joiner: PeerId) {
        self.readmit(joiner).await;
    }

    /// Checks a home's public record and stores it in the home document: the HomeId must
    /// be its root key's, and only devices whose certificates verify under that root are
    /// kept.
    pub(crate) async fn record_paired_home(
        &mut self,
        public: &HomePublic,
        via: &str,
    ) -> Result<PairedWith, Error> {
        if crate::home::home_id_for(&public.root_public) != public.home_id {
            return Err(Error::Pairing(
                "the other home's HomeId does not match its root key".into(),
            ));
        }
        let mut devices = BTreeMap::new();
        for (peer, cert) in &public.devices {
            if let Some(owner) = self.home_of_device(peer, Some(&public.home_id)) {
                tracing::warn!(%peer, home = %public.home_id, %owner, "dropping a device that belongs to another home");
                continue;
            }
            if devices.len() >= MAX_DEVICES_PER_PAIRED_HOME {
                tracing::warn!(home = %public.home_id, cap = MAX_DEVICES_PER_PAIRED_HOME, "dropping devices past the cap");
                break;
            }
            match DeviceCert::verify_bytes(cert, &public.root_public) {
                Verdict::Valid(c) if c.peer_id() == peer => {
                    devices.insert(peer.clone(), cert.to_vec());
                }
                _ => {
                    tracing::warn!(%peer, home = %public.home_id, "dropping a device whose certificate does not verify")
                }
            }
        }
        let name: String = public.name.chars().take(128).collect();
        let record = home_schema::PairedHome {
            name: name.clone(),
            root_key: public.root_public.to_vec(),
            devices,
            by: Some(self.peer_id.clone()),
            // Pairing again keeps an opt-in to the home's emergency alerts.
            accept_alerts: self
                .engine
                .home_paired(self.home.home_doc)
                .ok()
                .and_then(|p| p.get(&public.home_id).map(|h| h.accept_alerts))
                .unwrap_or(false),
        };
        let home_id = public.home_id.clone();
        let (_, out) = self
            .engine
            .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                home_schema::put_paired_home(d, &home_id, &record)
            })
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        self.store_in_order(batch).await?;
        self.entities.actor_names.clear();
        self.refresh_actor_homes();
        crate::audit::record_by(&self.store, via, "home.paired", &home_id).await;
        tracing::info!(home = %home_id, %name, "paired with a home");
        Ok(PairedWith {
            home_id: home_id.into(),
            name,
        })
    }

    /// Keeps the other home's issuing device dialled, now and after restarts, so the
    /// homes reconnect without mDNS.
    pub(crate) async fn keep_dialled(&mut self, issuer: PeerId, addrs: &[String]) {
        let key = crate::records::STATIC_PEERS_KEY.to_vec();
        let mut stored: Vec<String> = match self.store.get(Keyspace::Meta, key.clone()).await {
            Ok(Some(bytes)) => {
                crate::records::from_json("static peers", &bytes).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        for addr in addrs {
            let full = format!("{addr}/p2p/{issuer}");
            let Ok(multiaddr) = full.parse::<hearth_net::Multiaddr>() else {
                continue;
            };
            if let Err(error) = self.net.add_static_peer(multiaddr).await {
                tracing::warn!(%full, %error, "cannot keep the paired home's device dialled");
                continue;
            }
            if !stored.contains(&full) {
                stored.push(full);
            }
        }
        if let Ok(bytes) = crate::records::to_json("static peers", &stored)
            && let Err(error) = self.store.put(Keyspace::Meta, key, bytes).await
        {
            tracing::warn!(%error, "cannot store the paired home's address");
        }
    }

    /// Forgets a paired home: unshares everything shared with it (each entity's key
    /// rotates), stops syncing what it shared with this home, removes it from the home
    /// document and disconnects its devices.
    pub(crate) fn forget_home(
        &mut self,
        home: &str,
        fx: &mut Effects,
    ) -> Result<PairedWith, Error> {
        let (home_id, record) = self.resolve_home(home)?;
        for (entity_id, doc, _) in self.shares_to(&home_id) {
            self.revoke_share(&entity_id, doc, &home_id, fx)?;
        }
        let mut batch = Batch::new();
        for entry in self.sharing.shared_in.values_mut() {
            if entry.owner == home_id {
                entry.revoked = true;
            }
        }
        self.save_shared_in(&mut batch);
        let id = home_id.clone();
        let (_, out) = self
            .engine
            .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                home_schema::remove_paired_home(d, &id)
            })
            .map_err(doc_err)?;
        let more = self.handle_outputs(out);
        crate::core::append(&mut batch, more);
        fx.persist(batch);
        let peers: Vec<(String, PeerId)> = self
            .sharing
            .foreign
            .iter()
            .filter(|(_, f)| f.home == home_id)
            .map(|(p, f)| (p.clone(), f.net))
            .collect();
        // After the frames that tell them their grants ended.
        self.send_queued(fx);
        fx.forget_foreign(peers.iter().map(|(text, _)| text.clone()).collect());
        for (_, peer) in peers {
            fx.reject(peer, "peer belongs to a home this one forgot");
        }
        self.drop_sync_states_of_peers(record.devices.keys().cloned().collect());
        fx.audit(&self.peer_id, "home.forgotten", home_id.clone());
        Ok(PairedWith {
            home_id: home_id.into(),
            name: record.name,
        })
    }
}
