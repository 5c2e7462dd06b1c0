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

/// An in-memory store whose writes fail while `fail` is set, as a full disk's would.
pub(crate) struct FlakyStore {
    inner: hearth_storage::MemStore,
    pub(crate) fail: Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyStore {
    fn check(&self) -> Result<(), hearth_storage::Error> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(hearth_storage::Error::Backend {
                path: "<memory>".into(),
                detail: "no space left on device".into(),
            });
        }
        Ok(())
    }
}

impl hearth_storage::Store for FlakyStore {
    fn get(
        &self,
        keyspace: hearth_storage::Keyspace,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, hearth_storage::Error> {
        self.inner.get(keyspace, key)
    }
    fn put(
        &mut self,
        keyspace: hearth_storage::Keyspace,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), hearth_storage::Error> {
        self.check()?;
        self.inner.put(keyspace, key, value)
    }
    fn delete(
        &mut self,
        keyspace: hearth_storage::Keyspace,
        key: &[u8],
    ) -> Result<(), hearth_storage::Error> {
        self.check()?;
        self.inner.delete(keyspace, key)
    }
    fn scan(
        &self,
        keyspace: hearth_storage::Keyspace,
        scan: &hearth_storage::Scan,
    ) -> Result<Vec<hearth_storage::Entry>, hearth_storage::Error> {
        self.inner.scan(keyspace, scan)
    }
    fn apply_batch(&mut self, batch: hearth_storage::Batch) -> Result<(), hearth_storage::Error> {
        self.check()?;
        self.inner.apply_batch(batch)
    }
    fn flush(&mut self) -> Result<(), hearth_storage::Error> {
        self.check()?;
        self.inner.flush()
    }
}

impl TestCore {
    /// A new home's first device, named `name`, with no batching window.
    pub(crate) async fn start(name: &str) -> Self {
        Self::start_on(name, hearth_storage::open_in_memory().unwrap()).await
    }

    /// Like [`TestCore::start`], on a store whose writes fail while the flag is set.
    pub(crate) async fn start_flaky(name: &str) -> (Self, Arc<std::sync::atomic::AtomicBool>) {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = hearth_storage::StoreHandle::spawn(FlakyStore {
            inner: hearth_storage::MemStore::new(),
            fail: fail.clone(),
        })
        .unwrap();
        (Self::start_on(name, store).await, fail)
    }

    async fn start_on(name: &str, store: hearth_storage::StoreHandle) -> Self {
        Self::start_with(name, store, 32 * 1024 * 1024).await
    }

    /// Like [`TestCore::start`], on `store`, with `cache_bytes` for loaded documents.
    pub(crate) async fn start_with(
        name: &str,
        store: hearth_storage::StoreHandle,
        cache_bytes: usize,
    ) -> Self {
        let identity = hearth_net::DeviceIdentity::generate();
        let (net, stream, net_events) = hearth_net::testing::detached(identity.to_peer_id());
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
            crate::users::UsersConfig::default(),
            cache_bytes,
            crate::config::HistoryConfig::default(),
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

    /// Writes entity `id` with `state` through the entities service and waits for the
    /// answer.
    pub(crate) async fn set_entity(&self, id: &str, state: &str) -> crate::entities::Entity {
        let id = id.to_string();
        let write = crate::entities::EntityWrite {
            state: state.into(),
            ..crate::entities::EntityWrite::default()
        };
        self.core
            .call(
                move |reply| crate::entities::service::EntityRequest::SetEntity {
                    id,
                    write,
                    reply,
                },
            )
            .await
            .unwrap()
            .unwrap()
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

/// A closure for the core to run (unit tests only): a receive path, fed what a peer
/// would send, without a network.
pub(crate) struct OnCore {
    run: Box<dyn for<'a> FnOnce(&'a mut super::Core) -> CoreFuture<'a> + Send>,
    done: tokio::sync::oneshot::Sender<()>,
}

/// What an [`OnCore`] closure returns.
pub(crate) type CoreFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

impl OnCore {
    pub(crate) async fn run(self, core: &mut super::Core) {
        (self.run)(core).await;
        let _ = self.done.send(());
    }
}

impl TestCore {
    /// Runs `f` on the core, between its requests, and waits for it.
    pub(crate) async fn on_core(
        &self,
        f: impl for<'a> FnOnce(&'a mut super::Core) -> CoreFuture<'a> + Send + 'static,
    ) {
        let (done, rx) = tokio::sync::oneshot::channel();
        let request = super::Request::OnCore(OnCore {
            run: Box::new(f),
            done,
        });
        self.core.tx.send(request).await.unwrap();
        rx.await.unwrap();
    }
}
