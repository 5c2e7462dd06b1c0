//! Device pairing, issuer side: invite codes, the SPAKE2 exchange with a joining device,
//! and the grant that makes it a member of this home.

use std::collections::HashMap;

use hearth_crdt::schema::home as home_schema;
use hearth_crdt::{DocId, KeyEpoch};
use hearth_net::PeerId;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::core::Reply;
use crate::core::{Core, doc_err, now_ms};
use crate::trust::cert::DeviceCert;
use crate::trust::invite::{DEFAULT_MAX_OUTSTANDING, InviteBook, InviteKind, Issuer};
use crate::trust::pake::{Grant, IssuerHandshake, VerifiedJoiner};

/// Requests of the pairing service.
pub(crate) enum PairingRequest {
    CreateInvite {
        home: bool,
        ttl_s: u64,
        reply: Reply<NewInvite>,
    },
}

/// What a joining device receives, inside the sealed grant: the home's public record and
/// the keys of the home and registry documents. Every other document key reaches it
/// wrapped for its own X25519 key in the home document, so the grant stays small however
/// many entities the home has.
#[derive(Serialize, Deserialize)]
pub(crate) struct JoinPackage {
    pub(crate) home_id: String,
    pub(crate) name: String,
    pub(crate) root_public: [u8; 32],
    pub(crate) home_doc: DocId,
    pub(crate) registry_doc: DocId,
    pub(crate) keys: Vec<(DocId, KeyEpoch, [u8; 32])>,
    /// Where the issuer listens, as `/ip4/../tcp/N/p2p/PEERID`, to keep dialled.
    pub(crate) peers: Vec<String>,
}

/// Open invites and exchanges in progress.
pub(crate) struct Pairing {
    pub(crate) book: InviteBook,
    handshakes: HashMap<PeerId, IssuerHandshake>,
}

impl Default for Pairing {
    fn default() -> Self {
        Self {
            book: InviteBook::new(DEFAULT_MAX_OUTSTANDING),
            handshakes: HashMap::new(),
        }
    }
}

/// A new invite code and when it expires (Unix seconds).
pub(crate) struct NewInvite {
    pub(crate) code: String,
    pub(crate) expires_at_s: u64,
}

impl Core {
    /// Issues a single-use device invite. Only the admin device, which holds the home's
    /// root key, can sign certificates and so invite.
    pub(crate) async fn create_invite(
        &mut self,
        home: bool,
        ttl_s: u64,
    ) -> Result<NewInvite, Error> {
        if !home && self.home.root_secret.is_none() {
            return Err(Error::Forbidden(
                "only the home's admin device (the one that created it) can invite devices".into(),
            ));
        }
        let addrs = self
            .net
            .listen_addrs()
            .await
            .map_err(|e| Error::Network(e.to_string()))?;
        let issuer = Issuer {
            peer_id: self.net.local_peer_id(),
            addrs: reachable(&addrs)
                .into_iter()
                .take(crate::trust::invite::MAX_INVITE_ADDRS)
                .collect(),
            home_id: self.home.home_id.clone(),
        };
        let now_s = now_ms() / 1000;
        let code = self
            .pairing
            .book
            .issue(
                if home {
                    InviteKind::Home
                } else {
                    InviteKind::Device
                },
                &issuer,
                ttl_s,
                now_s,
                crate::home::random()?,
            )
            .map_err(|e| Error::Invalid(e.to_string()))?;
        crate::audit::record(&self.store, "invite.created", &code.code_id().to_string()).await;
        Ok(NewInvite {
            code: code.encode(),
            expires_at_s: code.expires_at_s(),
        })
    }

    /// One message of a pairing exchange from `peer`; always answers, with a refusal
    /// when something is wrong, so the joiner can say why.
    pub(crate) async fn on_pair_request(&mut self, peer: PeerId, bytes: &[u8]) -> Vec<u8> {
        let now_s = now_ms() / 1000;
        let me = self.net.local_peer_id();
        let Some(handshake) = self.pairing.handshakes.remove(&peer) else {
            return match IssuerHandshake::receive_start(
                &mut self.pairing.book,
                &me,
                &peer,
                bytes,
                now_s,
            ) {
                Ok((handshake, reply)) => {
                    self.pairing.handshakes.insert(peer, handshake);
                    reply
                }
                Err(failure) => {
                    tracing::info!(%peer, error = %failure.error, "pairing refused");
                    failure.reply.unwrap_or_default()
                }
            };
        };
        let verified = match handshake.receive_confirm(&mut self.pairing.book, bytes) {
            Ok(v) => v,
            Err(failure) => {
                tracing::info!(%peer, error = %failure.error, "pairing refused");
                return failure.reply.unwrap_or_default();
            }
        };
        if verified.kind() == InviteKind::Home {
            return self.grant_home_pairing(verified, now_s).await;
        }
        match self.grant(verified, now_s).await {
            Ok(reply) => reply,
            Err(reply) => reply,
        }
    }

    /// A home that proved a home code: it is recorded, this home's public record goes back
    /// in the grant, and its device is admitted.
    pub(crate) async fn grant_home_pairing(
        &mut self,
        verified: VerifiedJoiner,
        now_s: u64,
    ) -> Vec<u8> {
        let peer = *verified.peer_id();
        let refuse = |e: String| {
            tracing::warn!(%peer, error = %e, "cannot pair with the home");
            crate::trust::pake::refusal(crate::trust::pake::Refusal::Failed).unwrap_or_default()
        };
        // The code is consumed only by sealing the grant: check that will work before
        // recording the other home.
        if let Err(error) = self.pairing.book.check(&verified.code_id(), now_s) {
            return refuse(error.to_string());
        }
        let extra = verified.info().extra.to_vec();
        let mine = match self.grant_home(&peer.to_base58(), &extra).await {
            Ok(mine) => mine,
            Err(e) => return refuse(e),
        };
        let grant = Grant {
            certificate: Vec::new().into(),
            home: mine.into(),
            home_doc: Vec::new().into(),
        };
        let sealed = match verified.seal_grant(&mut self.pairing.book, &grant, now_s) {
            Ok(sealed) => sealed,
            Err(f) => {
                tracing::info!(%peer, error = %f.error, "home pairing refused at grant");
                return f.reply.unwrap_or_default();
            }
        };
        self.after_home_granted(peer).await;
        sealed
    }

    /// Issues the joiner's certificate and seals the grant; records the device in the home
    /// document only once the grant is sealed (and the code consumed).
    pub(crate) async fn grant(
        &mut self,
        verified: VerifiedJoiner,
        now_s: u64,
    ) -> Result<Vec<u8>, Vec<u8>> {
        let peer = verified.peer_id().to_base58();
        let info = verified.info().clone();
        let refuse = |e: String| {
            tracing::warn!(%peer, error = %e, "cannot grant");
            crate::trust::pake::refusal(crate::trust::pake::Refusal::Failed).unwrap_or_default()
        };
        let root = self
            .home
            .root_secret
            .map(|s| ed25519_dalek::SigningKey::from_bytes(&s))
            .ok_or_else(|| refuse("this device holds no root key".into()))?;
        let name = crate::core::clean_device_name(&info.device_name);
        let cert = DeviceCert::issue(&root, &peer, info.x25519_public, &name, now_ms(), false)
            .and_then(|c| c.encode())
            .map_err(|e| refuse(e.to_string()))?;
        let mut peers = Vec::new();
        if let Ok(addrs) = self.net.listen_addrs().await {
            for a in addrs
                .iter()
                .filter(|a| !a.to_string().contains("/0.0.0.0/"))
            {
                peers.push(format!("{a}/p2p/{}", self.peer_id));
            }
        }
        let package = JoinPackage {
            home_id: self.home.home_id.clone(),
            name: self.home.name.clone(),
            root_public: self.home.root_public,
            home_doc: self.home.home_doc,
            registry_doc: self.home.registry_doc,
            keys: self
                .keyring
                .ids()
                .filter(|(d, _)| *d == self.home.home_doc || *d == self.home.registry_doc)
                .filter_map(|(d, e)| self.keyring.get(d, e).map(|k| (d, e, *k.expose_secret())))
                .collect(),
            peers,
        };
        let home = crate::trust::wire::to_cbor("join package", &package)
            .map_err(|e| refuse(e.to_string()))?;
        let grant = Grant {
            certificate: cert.clone().into(),
            home: home.into(),
            home_doc: Vec::new().into(),
        };
        let sealed = verified
            .seal_grant(&mut self.pairing.book, &grant, now_s)
            .map_err(|f| {
                tracing::info!(%peer, error = %f.error, "pairing refused at grant");
                f.reply.unwrap_or_default()
            })?;
        let record = home_schema::DeviceRecord {
            name,
            certificate: cert,
            revoked_at: None,
        };
        let mut wraps = Vec::new();
        for (doc, epoch) in self.keyring.ids() {
            // Keys of entities other homes share with this one stay with the devices they
            // were granted to: a home never relays them, not even to its own new devices.
            if doc == self.home.home_doc
                || doc == self.home.registry_doc
                || self.is_foreign_doc(doc)
            {
                continue;
            }
            let Some(key) = self.keyring.get(doc, epoch) else {
                continue;
            };
            match crate::trust::keys::wrap_key(key, doc, epoch, &info.x25519_public) {
                Ok(w) => wraps.push((doc, epoch, w.to_bytes().to_vec())),
                Err(error) => {
                    tracing::warn!(%peer, %doc, %error, "cannot wrap a key for the new device")
                }
            }
        }
        let added = self
            .engine
            .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                home_schema::put_device(d, &peer, &record)?;
                for (doc, epoch, wrapped) in &wraps {
                    home_schema::put_wrapped_key(d, *doc, epoch, &peer, wrapped)?;
                }
                Ok(())
            })
            .map_err(doc_err);
        match added {
            Ok((_, out)) => {
                let batch = self.handle_outputs(out);
                if let Err(error) = self.store_in_order(batch).await {
                    tracing::error!(%error, "could not persist the new device");
                }
                crate::audit::record(&self.store, "device.paired", &peer).await;
                tracing::info!(%peer, "paired a new device");
            }
            Err(error) => tracing::error!(%peer, %error, "could not record the new device"),
        }
        Ok(sealed)
    }
}

/// The listen addresses worth giving another device: concrete ones, and loopback only when
/// there is nothing else (a loopback address names the other device itself).
fn reachable(addrs: &[hearth_net::Multiaddr]) -> Vec<String> {
    let concrete: Vec<String> = addrs
        .iter()
        .map(|a| a.to_string())
        .filter(|a| !a.starts_with("/ip4/0.0.0.0/") && !a.starts_with("/ip6/::/"))
        .collect();
    let (loopback, other): (Vec<String>, Vec<String>) = concrete
        .into_iter()
        .partition(|a| a.starts_with("/ip4/127.") || a.starts_with("/ip6/::1/"));
    if other.is_empty() { loopback } else { other }
}

impl PairingRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        false
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::CreateInvite { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl Core {
    /// Answers a request of the pairing service.
    pub(crate) async fn handle_pairing(&mut self, request: PairingRequest) {
        match request {
            PairingRequest::CreateInvite { home, ttl_s, reply } => {
                let _ = reply.send(self.create_invite(home, ttl_s).await);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PairingRequest;
    use crate::core::testing::TestCore;

    #[tokio::test]
    async fn the_admin_issues_device_and_home_invites_of_their_kind() {
        let t = TestCore::start("admin").await;
        for (home, kind) in [(false, "device"), (true, "home")] {
            let invite = t
                .core
                .call(|reply| PairingRequest::CreateInvite {
                    home,
                    ttl_s: 60,
                    reply,
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(crate::invite_code_kind(&invite.code).unwrap(), kind);
            assert!(invite.expires_at_s > 0);
        }
        t.stop().await;
    }
}
