//! A core with no sockets and no disk, for the services' unit tests: an in-memory store
//! and a detached network (`hearth_net::testing`), on which a test plays the peers.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{CoreHandle, NodeFacts};
use crate::rooms::service::ChatRetention;

/// A running core and what drives it.
pub(crate) struct TestCore {
    pub(crate) core: CoreHandle,
    pub(crate) facts: NodeFacts,
    pub(crate) peer_id: String,
    pub(crate) store: hearth_storage::StoreHandle,
    /// Feeds the core's network events (hellos, frames, disconnections).
    pub(crate) net_events: tokio::sync::mpsc::Sender<hearth_net::Event>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestCore {
    /// A new home's first device, named `name`, with no batching window.
    pub(crate) async fn start(name: &str) -> Self {
        let identity = hearth_net::DeviceIdentity::generate();
        let (net, stream, net_events) = hearth_net::testing::detached(identity.to_peer_id());
        let store = hearth_storage::open_in_memory().unwrap();
        let cancel = CancellationToken::new();
        let (core, facts, task) = super::start(
            store.clone(),
            identity.peer_id(),
            &identity.peer_id_bytes(),
            name,
            net,
            stream,
            Arc::new(crate::metrics::Metrics::new()),
            std::time::Duration::ZERO,
            ChatRetention {
                max_messages: 1000,
                max_age: std::time::Duration::from_secs(30 * 24 * 3600),
            },
            cancel.clone(),
        )
        .await
        .unwrap();
        Self {
            core,
            facts,
            peer_id: identity.peer_id(),
            store,
            net_events,
            cancel,
            task,
        }
    }

    /// Every event the core emits from now on.
    pub(crate) fn events(&self) -> tokio::sync::broadcast::Receiver<crate::events::Event> {
        self.core.node_events.subscribe()
    }

    /// Stops the core and waits for it.
    pub(crate) async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}
