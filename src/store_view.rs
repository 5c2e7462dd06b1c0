//! What the HTTP layer may see of the store: its health, a readiness probe and pages of
//! the audit log. No keyspace, key or record encoding crosses this line; those live in
//! `records.rs` and the services.

use hearth_storage::{Health, Keyspace, StoreHandle};

use crate::Error;

/// A read-only view of the node's store for the API.
#[derive(Clone)]
pub(crate) struct StoreView(StoreHandle);

impl StoreView {
    pub(crate) fn new(store: StoreHandle) -> Self {
        Self(store)
    }

    /// The store's health latch: a memory read, answered at once.
    pub(crate) fn health(&self) -> Health {
        self.0.health()
    }

    /// Reads one small record, to show the store thread answers.
    pub(crate) async fn probe(&self) -> Result<(), Error> {
        self.0
            .get(Keyspace::Meta, crate::records::IDENTITY_KEY.to_vec())
            .await?;
        Ok(())
    }

    /// The newest `limit` audit entries from `since_ms` on and before the cursor `before`.
    pub(crate) async fn audit_page(
        &self,
        since_ms: u64,
        before: Option<&str>,
        limit: usize,
    ) -> Result<crate::audit::Page, Error> {
        crate::audit::page(&self.0, since_ms, before, limit).await
    }
}
