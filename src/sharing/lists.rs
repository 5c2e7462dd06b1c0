//! Listings of shares and paired homes.
//!
//! Both need the entities this home shares, and finding them reads the whole registry
//! (one entry per entity of the home). That read runs as a read job on a copy of the
//! registry document; the job hands the shared entries back to the core
//! ([`crate::sharing::service::SharingRequest::FinishShareList`]), which adds what only it holds (each shared
//! document's policy and key epoch, entities shared in, paired homes, revocations) at a
//! cost that grows with the shares, not with the home.

use hearth_crdt::{DocId, Registry};
use tokio::sync::oneshot;

use crate::Error;
use crate::core::{Core, Reply, doc_err};
use crate::shares::{KnownHome, ShareIn, ShareOut, SharedList};
use crate::sharing::service::epoch_text;

/// One share of an entity of this home, as the registry has it.
#[derive(Debug)]
pub(crate) struct Row {
    entity_id: String,
    home: String,
    doc: DocId,
    rights: String,
    /// The device that wrote the share.
    by: Option<String>,
}

/// Which listing the rows are for.
pub(crate) enum ListReply {
    Shares(Reply<SharedList>),
    Homes(Reply<Vec<KnownHome>>),
}

impl ListReply {
    pub(crate) fn fail(self, error: Error) {
        match self {
            Self::Shares(reply) => {
                let _ = reply.send(Err(error));
            }
            Self::Homes(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The shares of every live entity in `registry`.
fn shared_rows(registry: &automerge::AutoCommit) -> Result<Vec<Row>, Error> {
    let reg = Registry::read(registry).map_err(doc_err)?;
    Ok(reg
        .entities
        .into_iter()
        .filter(|(_, e)| e.deleted_at.is_none())
        .flat_map(|(id, e)| {
            let doc = e.doc;
            e.shares.into_iter().map(move |(home, share)| Row {
                entity_id: id.clone(),
                home,
                doc,
                rights: share.rights.as_str().to_string(),
                by: share.by,
            })
        })
        .collect())
}

impl Core {
    /// Starts a share or home listing: copies the registry document for a read job.
    pub(crate) fn list_shared(&mut self, reply: ListReply) {
        let copy = self
            .engine
            .doc_copy(self.home.registry_doc)
            .map_err(doc_err);
        let (copy, tx) = match (copy, self.self_tx.clone()) {
            (Ok(copy), Some(tx)) => (copy, tx),
            (Err(e), _) => return reply.fail(e),
            (Ok(_), None) => {
                return reply.fail(Error::Internal("the core cannot reach itself".into()));
            }
        };
        #[cfg(test)]
        let gate = crate::entities::ops::tests::gate_for(&format!("shares:{}", self.home.home_id));
        let (rows_tx, rows) = oneshot::channel();
        self.spawn_read(rows_tx, move || {
            #[cfg(test)]
            if let Some(gate) = gate {
                gate.hold();
            }
            shared_rows(&copy)
        });
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                match rows.await {
                    Ok(Ok(rows)) => {
                        // A core that stopped drops the request, and with it the reply.
                        let _ = tx
                            .send(
                                crate::sharing::service::SharingRequest::FinishShareList {
                                    rows,
                                    reply,
                                }
                                .into(),
                            )
                            .await;
                    }
                    Ok(Err(e)) => reply.fail(e),
                    Err(_) => reply.fail(Error::Internal("share listing dropped".into())),
                }
            },
            tracing::error_span!("share_list"),
        ));
    }

    /// Finishes a listing from the registry's shared entries.
    pub(crate) fn finish_share_list(&mut self, rows: Vec<Row>, reply: ListReply) {
        let list = self.share_list(&rows);
        match reply {
            ListReply::Shares(reply) => {
                let _ = reply.send(Ok(list));
            }
            ListReply::Homes(reply) => {
                let _ = reply.send(Ok(self.home_list(&rows, &list)));
            }
        }
    }

    pub(crate) fn share_list(&self, rows: &[Row]) -> SharedList {
        let shared_out = rows
            .iter()
            .map(|r| ShareOut {
                entity_id: r.entity_id.clone().into(),
                home: r.home.clone().into(),
                rights: crate::Rights::from_stored(&r.rights),
                policy: self.policy_name(r.doc),
                epoch: self
                    .engine
                    .header(r.doc)
                    .map(|h| epoch_text(&h.key_epoch))
                    .unwrap_or_default(),
            })
            .collect();
        let shared_in = self
            .sharing
            .shared_in
            .values()
            .map(|s| ShareIn {
                entity_id: s.entity_id.clone().into(),
                owner: s.owner.clone().into(),
                rights: crate::Rights::from_stored(&s.rights),
                revoked: s.revoked,
            })
            .collect();
        SharedList {
            shared_out,
            shared_in,
        }
    }

    pub(crate) fn home_list(&self, rows: &[Row], list: &SharedList) -> Vec<KnownHome> {
        let revoked = |by: &Option<String>| {
            by.as_ref()
                .filter(|p| self.revocations.contains(p))
                .cloned()
        };
        self.paired()
            .into_iter()
            .map(|(home_id, h)| KnownHome {
                revoked_devices: self
                    .revocations
                    .peers_of(&home_id)
                    .map(Into::into)
                    .collect(),
                made_by_revoked: revoked(&h.by)
                    .map(|p| format!("pairing by {p}"))
                    .into_iter()
                    .chain(rows.iter().filter(|r| r.home == home_id).filter_map(|r| {
                        let by = revoked(&r.by)?;
                        Some(format!("share {} by {by}", r.entity_id))
                    }))
                    .collect(),
                we_share: rows
                    .iter()
                    .filter(|r| r.home == home_id)
                    .map(|r| r.entity_id.clone().into())
                    .collect(),
                they_share: list
                    .shared_in
                    .iter()
                    .filter(|s| s.owner == home_id && !s.revoked)
                    .map(|s| s.entity_id.clone())
                    .collect(),
                devices: h.devices.keys().map(Into::into).collect(),
                name: h.name,
                home_id: home_id.into(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::core::testing::TestCore;
    use crate::sharing::service::SharingRequest;

    /// Sharing requests on a core with no sockets and no paired home.
    #[tokio::test]
    async fn with_no_paired_home_nothing_is_listed_and_sharing_is_refused() {
        let t = TestCore::start("hub").await;
        let homes = t
            .core
            .call(|reply| SharingRequest::ListHomes { reply })
            .await
            .unwrap()
            .unwrap();
        assert!(homes.is_empty());
        let shares = t
            .core
            .call(|reply| SharingRequest::ListShares { reply })
            .await
            .unwrap()
            .unwrap();
        assert!(shares.shared_out.is_empty() && shares.shared_in.is_empty());
        let refused = t
            .core
            .call(|reply| SharingRequest::Share {
                entity_id: "light.a".into(),
                home: "nowhere".into(),
                read_only: true,
                policy: None,
                reply,
            })
            .await
            .unwrap();
        assert!(refused.is_err(), "an unknown home is refused");
        let garbage = t
            .core
            .call(|reply| SharingRequest::PairHome {
                code: "not a code".into(),
                reply,
            })
            .await
            .unwrap();
        assert!(garbage.is_err());
        t.stop().await;
    }
}
