//! Sharing between homes: paired homes, the entities shared each way, and the handle that
//! pairs, shares and unshares.

use serde::{Deserialize, Serialize};

use crate::core::CoreHandle;
use crate::{DeviceId, EntityId, Error, HomeId, Policy, Rights, Timestamp};

/// A home this one is paired with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownHome {
    /// Its HomeId.
    pub home_id: HomeId,
    /// Its name.
    pub name: String,
    /// Devices of it this home knows (PeerIds).
    pub devices: Vec<DeviceId>,
    /// Entities this home shares with it.
    pub we_share: Vec<EntityId>,
    /// Entities it shares with this home.
    pub they_share: Vec<EntityId>,
    /// Its devices revoked by its root key (this home refuses them).
    pub revoked_devices: Vec<DeviceId>,
    /// What a since-revoked device of this home set up with it, for the admin to undo:
    /// `pairing by PEER`, or `share ENTITY by PEER`.
    pub made_by_revoked: Vec<String>,
}

/// One entity of this home shared with another home.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareOut {
    /// The entity id.
    pub entity_id: EntityId,
    /// The grantee home.
    pub home: HomeId,
    /// `read` or `write`; `none` once unshared.
    pub rights: Rights,
    /// The conflict policy of the entity.
    pub policy: Policy,
    /// The key epoch the entity is sealed under now, as `counter-device`.
    pub epoch: String,
}

/// One entity another home shares with this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareIn {
    /// The entity id.
    pub entity_id: EntityId,
    /// The owner home.
    pub owner: HomeId,
    /// `read` or `write`.
    pub rights: Rights,
    /// Whether the owner took the grant back (what arrived before stays readable).
    pub revoked: bool,
}

/// Both directions at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedList {
    /// What this home shares.
    pub shared_out: Vec<ShareOut>,
    /// What other homes share with this one.
    pub shared_in: Vec<ShareIn>,
}

/// Paired with a home.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairedWith {
    /// Its HomeId.
    pub home_id: HomeId,
    /// Its name.
    pub name: String,
}

/// One audit entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    pub time: Timestamp,
    /// What happened, e.g. `share.granted`.
    pub action: String,
    /// Who did it: this device, or the remote device whose request it was.
    #[serde(default)]
    pub actor: String,
    /// What it concerned.
    pub subject: String,
}

/// Sharing operations of a running node; get one from [`crate::Node::shares`].
#[derive(Clone)]
pub struct Shares {
    pub(crate) core: CoreHandle,
}

impl Shares {
    /// Pairs this home with the home that issued `code` (a home invite code), which must be
    /// running and reachable.
    pub async fn pair(&self, code: &str) -> Result<PairedWith, Error> {
        let code = code.trim().to_string();
        self.core
            .call(|reply| crate::sharing::service::SharingRequest::PairHome { code, reply })
            .await?
    }

    /// Paired homes, with what is shared each way.
    pub async fn homes(&self) -> Result<Vec<KnownHome>, Error> {
        self.core
            .call(|reply| crate::sharing::service::SharingRequest::ListHomes { reply })
            .await?
    }

    /// Forgets a paired home (by HomeId or unique name): every entity shared with it is
    /// unshared (its key rotates), and its devices are no longer admitted.
    pub async fn forget(&self, home: &str) -> Result<PairedWith, Error> {
        let home = home.to_string();
        self.core
            .call(|reply| crate::sharing::service::SharingRequest::ForgetHome { home, reply })
            .await?
    }

    /// Shares an entity of this home with a paired home (by HomeId or unique name), with
    /// [`Rights::Read`] or [`Rights::Write`]. `policy` sets the entity's conflict policy
    /// at the same time.
    pub async fn share(
        &self,
        entity_id: impl Into<EntityId>,
        home: &str,
        rights: Rights,
        policy: Option<Policy>,
    ) -> Result<ShareOut, Error> {
        let read_only = match rights {
            Rights::Read => true,
            Rights::Write => false,
            Rights::None => {
                return Err(Error::Invalid(
                    "cannot share with rights none; share with read or write, and unshare to \
                     take a grant back"
                        .into(),
                ));
            }
        };
        let policy = policy.map(|p| p.as_str().to_string());
        self.share_request(entity_id.into().into_string(), home, read_only, policy)
            .await
    }

    /// [`Shares::share`] as the API asks for it: with the policy as text, so the core
    /// checks the request in its own order (home, entity, then policy).
    pub(crate) async fn share_request(
        &self,
        entity_id: String,
        home: &str,
        read_only: bool,
        policy: Option<String>,
    ) -> Result<ShareOut, Error> {
        let home = home.to_string();
        self.core
            .call(|reply| crate::sharing::service::SharingRequest::Share {
                entity_id,
                home,
                read_only,
                policy,
                reply,
            })
            .await?
    }

    /// Stops sharing an entity with a home (by HomeId or unique name): the entity's key
    /// rotates, and the home reads nothing written after this.
    pub async fn unshare(
        &self,
        entity_id: impl Into<EntityId>,
        home: &str,
    ) -> Result<ShareOut, Error> {
        let (entity_id, home) = (entity_id.into().into_string(), home.to_string());
        self.core
            .call(|reply| crate::sharing::service::SharingRequest::Unshare {
                entity_id,
                home,
                reply,
            })
            .await?
    }

    /// What this home shares, and what is shared with it.
    pub async fn list(&self) -> Result<SharedList, Error> {
        self.core
            .call(|reply| crate::sharing::service::SharingRequest::ListShares { reply })
            .await?
    }

    /// The audit log, oldest first, from `since` on.
    pub async fn audit(&self, since: Timestamp) -> Result<Vec<AuditEntry>, Error> {
        crate::audit::list(&self.core_store().await?, since.unix_ms()).await
    }

    async fn core_store(&self) -> Result<hearth_storage::StoreHandle, Error> {
        self.core
            .call(|reply| crate::core::NodeRequest::Store { reply })
            .await?
    }
}
