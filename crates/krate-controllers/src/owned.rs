//! What a controller owns, read from a shared informer instead of listed from the API on
//! every reconcile. A controller records what it creates, changes and deletes, and reads
//! nothing for that owner until the cache shows those writes (client-go's controller
//! expectations): a ReplicaSet acting on a cache one create behind would create that
//! pod twice.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
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

    /// The objects in `namespace` that no controller owns, are not being deleted and
    /// match `selector`: what a controller with that selector adopts.
    pub fn orphans(&self, namespace: &str, selector: &str) -> Vec<K> {
        let free = |o: &K| krate_client::informer::controller_uid(o).is_none() && o.meta().deletion_timestamp.is_none();
        let candidates = self.informer.in_namespace(namespace).into_iter();
        candidates.filter(|o| free(o) && selects(selector, &**o)).map(Arc::unwrap_or_clone).collect()
    }

    /// Claims objects as upstream's controllers do: of `controlled` (what `owner`
    /// controls), those that no longer match `selector` are released (its reference
    /// removed) and left out; the orphans in `namespace` that match are adopted
    /// (`reference` added) and joined.
    pub async fn claim(
        &self,
        api: &kube::Api<K>,
        owner: &str,
        reference: &OwnerReference,
        namespace: &str,
        selector: &str,
        controlled: Vec<K>,
    ) -> kube::Result<Vec<K>> {
        let mut owned = Vec::new();
        for obj in controlled {
            if selects(selector, &obj) {
                owned.push(obj);
            } else if obj.meta().deletion_timestamp.is_none() {
                let refs: Vec<_> = obj.owner_references().iter().filter(|r| r.uid != owner).cloned().collect();
                let released = set_owner_references(api, &obj, refs).await?;
                self.updated(owner, &obj, &released);
            }
        }
        for orphan in self.orphans(namespace, selector) {
            let mut refs = orphan.owner_references().to_vec();
            refs.push(reference.clone());
            let adopted = set_owner_references(api, &orphan, refs).await?;
            self.updated(owner, &orphan, &adopted);
            owned.push(adopted);
        }
        Ok(owned)
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

/// The owner reference a controller puts on what it controls.
pub fn controller_reference<O: kube::Resource<DynamicType = D>, D>(owner: &O, dt: &D) -> OwnerReference {
    OwnerReference {
        api_version: O::api_version(dt).into_owned(),
        kind: O::kind(dt).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Replaces an object's owner references, on the condition that it is still the object
/// seen (its uid and resourceVersion), as upstream's adoption and release do.
pub async fn set_owner_references<K: Watched>(
    api: &kube::Api<K>,
    obj: &K,
    refs: Vec<OwnerReference>,
) -> kube::Result<K> {
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": refs, "uid": obj.uid(), "resourceVersion": obj.resource_version()}});
    api.patch(&obj.name_any(), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(patch)).await
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

/// The owners in `store` that would adopt `obj` (an orphan in their namespace that the
/// selector `selector_of` gives matches): upstream's controllers look at those when an
/// orphan changes, so a pod let go is claimed again without waiting for a resync.
pub fn adopters<O, K>(
    store: &kube::runtime::reflector::Store<O>,
    obj: &K,
    selector_of: impl Fn(&O) -> Option<String>,
) -> Vec<kube::runtime::reflector::ObjectRef<O>>
where
    O: kube::Resource<DynamicType = ()> + Clone,
    K: kube::Resource,
{
    if krate_client::informer::controller_uid(obj).is_some() || obj.meta().deletion_timestamp.is_some() {
        return Vec::new();
    }
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace == obj.meta().namespace)
        .filter(|o| selector_of(o).is_some_and(|s| selects(&s, obj)))
        .map(|o| kube::runtime::reflector::ObjectRef::from_obj(&**o))
        .collect()
}

/// The pods a controller owns.
pub type OwnedPods = Owned<k8s_openapi::api::core::v1::Pod>;
