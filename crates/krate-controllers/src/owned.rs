//! What a controller owns, read from a shared informer instead of listed from the API on
//! every reconcile. A controller records what it creates, changes and deletes, and reads
//! nothing for that owner until the cache shows those writes (client-go's controller
//! expectations): a ReplicaSet acting on a cache one create behind would create that
//! pod twice.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use krate_client::expectations::Expectations;
use krate_client::informer::Watched;
use kube::ResourceExt;

use crate::selector::selects;
use crate::Informer;

/// How soon a controller looks again while its cache lags (the events it waits for
/// normally come first and trigger the next pass).
pub const CACHE_LAG_RETRY: Duration = Duration::from_secs(1);

pub struct Owned<K: Watched> {
    informer: Informer<K>,
    expectations: Expectations<K>,
}

impl<K: Watched> Owned<K> {
    pub fn new(informer: &Informer<K>) -> Self {
        Self { informer: informer.clone(), expectations: Expectations::default() }
    }

    /// Waits until the informer has listed everything.
    pub async fn synced(&self) {
        self.informer.synced().await
    }

    /// Changes of owned objects, to trigger reconciles of their owners.
    pub fn changes(&self) -> UnboundedReceiver<Arc<K>> {
        self.informer.subscribe()
    }

    /// The objects controlled by `owner` (a uid) whose labels match `selector` (a
    /// query; None: any), or None while the cache has not caught up with this
    /// controller's own writes for that owner.
    pub fn of(&self, owner: &str, selector: Option<&str>) -> Option<Vec<K>> {
        if !self.expectations.satisfied(owner, &self.informer) {
            return None;
        }
        let owned = self.informer.controlled_by(owner).into_iter();
        Some(owned.filter(|o| selector.is_none_or(|s| selects(s, &**o))).map(Arc::unwrap_or_clone).collect())
    }

    /// Whether writes for `owner` are still to show in the cache.
    pub fn waiting(&self, owner: &str) -> bool {
        self.expectations.pending(owner)
    }

    /// `owner` created `obj` (as the API answered).
    pub fn created(&self, owner: &str, obj: &K) {
        self.expectations.created(owner, obj)
    }

    /// `owner` changed `before` into `after` (as the API answered).
    pub fn updated(&self, owner: &str, before: &K, after: &K) {
        if before.resource_version() != after.resource_version() {
            self.expectations.updated(owner, before)
        }
    }

    /// `owner` deleted `obj`.
    pub fn deleted(&self, owner: &str, obj: &K) {
        self.expectations.deleted(owner, obj)
    }
}

/// Runs `controller` (once `informer` has listed) beside the watch that feeds the
/// informer: for a controller that is the only one following its kind.
pub async fn beside<K: Watched>(
    informer: &Informer<K>,
    api: kube::Api<K>,
    controller: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let controller = async {
        informer.synced().await;
        controller.await
    };
    tokio::select! {
        watched = informer.run(api) => watched,
        () = controller => Ok(()),
    }
}

/// The pods a controller owns.
pub type OwnedPods = Owned<k8s_openapi::api::core::v1::Pod>;
