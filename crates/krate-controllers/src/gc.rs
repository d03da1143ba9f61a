//! Garbage collector: follows ownerReferences across every deletable resource.
//! - A dependent whose owners are all gone is deleted (background propagation).
//! - An owner deleted with `propagationPolicy=Foreground` (finalizer
//!   `foregroundDeletion`) has its blocking dependents (`blockOwnerDeletion`) deleted
//!   first, in the foreground too, then loses the finalizer; the others are collected
//!   once it is gone; a blocking dependent another live owner still holds only loses
//!   its references to the owners being deleted. A dependent about to be deleted so whose own dependents are
//!   already waiting for theirs (a cycle of owners) stops blocking its owners first, as
//!   upstream breaks such cycles.
//! - An owner deleted with `Orphan` (finalizer `orphan`) has its references removed
//!   from its dependents, then loses the finalizer.
//!
//! Event-driven: one watch per resource feeds an in-memory graph; nothing acts before
//! every watch has listed once (`caches`: a log line when they have, a warning naming
//! any that has not after a while, gauges on `/metrics`). Discovery runs again every
//! [`REDISCOVERY`], so resources that appear later (custom resources) are followed too.
//! Before a dependent is collected its owners are looked up live, as upstream's
//! `isDangling`, so an owner the graph does not hold is never mistaken for a gone one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use krate_client::caches::Caches;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::core::PartialObjectMeta;
use kube::discovery::{verbs, Discovery, Scope};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::mpsc;

use crate::informer::Informer;

/// How often discovery runs again to find resources that appeared since.
pub const REDISCOVERY: Duration = Duration::from_secs(30);

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

#[derive(Clone, Debug)]
struct Item {
    resource: ApiResource,
    namespaced: bool,
    namespace: Option<String>,
    name: String,
    /// Owner uids.
    owners: Vec<String>,
    /// The owners whose deletion it blocks (`blockOwnerDeletion`).
    blocking: Vec<String>,
    deleting: bool,
    finalizers: Vec<String>,
}

enum Change {
    Seen(Box<Item>, String),
    Gone(String),
    /// The watch of this cache has listed once.
    Synced(String),
}

/// Where owners are looked up: (apiVersion, kind) to the resource and whether it is namespaced.
type Kinds = HashMap<(String, String), (ApiResource, bool)>;

#[derive(Default)]
struct Graph {
    items: HashMap<String, Item>,
    dependents: HashMap<String, HashSet<String>>,
}

impl Graph {
    fn insert(&mut self, uid: String, item: Item) {
        self.remove(&uid);
        for owner in &item.owners {
            self.dependents.entry(owner.clone()).or_default().insert(uid.clone());
        }
        self.items.insert(uid, item);
    }

    fn remove(&mut self, uid: &str) -> Option<Item> {
        let item = self.items.remove(uid)?;
        for owner in &item.owners {
            if let Some(set) = self.dependents.get_mut(owner) {
                set.remove(uid);
            }
        }
        Some(item)
    }

    fn dependents_of(&self, uid: &str) -> Vec<String> {
        self.dependents.get(uid).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Whether `uid` has a dependent deleted in the foreground (waiting for its own).
    fn has_dependent_waiting(&self, uid: &str) -> bool {
        self.dependents_of(uid)
            .iter()
            .filter_map(|d| self.items.get(d))
            .any(|d| d.deleting && d.finalizers.iter().any(|f| f == FOREGROUND))
    }
}

fn api_for(client: &kube::Client, item: &Item) -> Api<DynamicObject> {
    match (&item.namespace, item.namespaced) {
        (Some(ns), true) => Api::namespaced_with(client.clone(), ns, &item.resource),
        _ => Api::all_with(client.clone(), &item.resource),
    }
}

/// Deletes `item` if it still is object `uid` (and, with `resource_version`, unchanged
/// since it was read: a change in between is decided on again when its event comes).
async fn delete(
    client: &kube::Client,
    item: &Item,
    uid: &str,
    resource_version: Option<String>,
    policy: PropagationPolicy,
) {
    let params = DeleteParams {
        propagation_policy: Some(policy),
        preconditions: Some(kube::api::Preconditions { uid: Some(uid.to_string()), resource_version }),
        ..Default::default()
    };
    match api_for(client, item).delete(&item.name, &params).await {
        Ok(_) => tracing::debug!(kind = %item.resource.kind, name = %item.name, "garbage collected"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => {
            tracing::warn!(kind = %item.resource.kind, name = %item.name, error = %e, "garbage collection failed")
        }
    }
}

/// Rewrites the owner references of `item`, read live, with `rewrite`; written only when
/// they change (orphaning, a solid owner's dependent, upstream's cycle breaking).
async fn rewrite_owner_references(
    client: &kube::Client,
    item: &Item,
    rewrite: impl FnOnce(&[OwnerReference]) -> Vec<OwnerReference>,
) {
    let api = api_for(client, item);
    let Ok(live) = api.get(&item.name).await else { return };
    let refs = rewrite(live.owner_references());
    if refs == live.owner_references() {
        return;
    }
    let patch = Patch::Merge(json!({"metadata": {"ownerReferences": refs}}));
    if let Err(e) = api.patch(&item.name, &PatchParams::default(), &patch).await {
        tracing::debug!(name = %item.name, error = %e, "rewriting owner references failed");
    }
}

async fn set_finalizers(client: &kube::Client, item: &Item, finalizers: Vec<String>) {
    let patch = Patch::Merge(json!({"metadata": {"finalizers": finalizers}}));
    if let Err(e) = api_for(client, item).patch(&item.name, &PatchParams::default(), &patch).await {
        tracing::debug!(name = %item.name, error = %e, "updating finalizers failed");
    }
}

/// Whether the owner a reference names is gone, asked of the API server: the graph may
/// not hold it yet (a resource discovered since) or hold it under a kind it cannot map.
async fn owner_gone(client: &kube::Client, kinds: &Kinds, namespace: Option<&str>, owner: &OwnerReference) -> bool {
    let Some((resource, namespaced)) = kinds.get(&(owner.api_version.clone(), owner.kind.clone())) else {
        tracing::debug!(kind = %owner.kind, api_version = %owner.api_version, "owner of an unknown kind; not collecting");
        return false;
    };
    let api: Api<PartialObjectMeta<DynamicObject>> = match (namespaced, namespace) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, resource),
        (true, None) => return false,
        (false, _) => Api::all_with(client.clone(), resource),
    };
    match api.get_metadata_opt(&owner.name).await {
        Ok(Some(live)) => live.uid().as_deref() != Some(owner.uid.as_str()),
        Ok(None) => true,
        Err(e) => {
            tracing::debug!(owner = %owner.name, error = %e, "looking up an owner failed");
            false
        }
    }
}

/// Acts on one object given the current graph.
async fn process(client: &kube::Client, kinds: &Kinds, graph: &Graph, uid: &str) {
    let Some(item) = graph.items.get(uid) else { return };
    // Owners all gone: collect (unless the object is already going).
    if !item.owners.is_empty() && !item.deleting && item.owners.iter().all(|o| !graph.items.contains_key(o)) {
        // Decide on the live object: its references may have changed (orphaning)
        // after the event the graph holds.
        let live = match api_for(client, item).get(&item.name).await {
            Ok(obj) if obj.uid().as_deref() == Some(uid) => obj,
            _ => return,
        };
        let owners = live.owner_references();
        if owners.is_empty() || owners.iter().any(|o| graph.items.contains_key(&o.uid)) {
            return;
        }
        for owner in owners {
            if !owner_gone(client, kinds, item.namespace.as_deref(), owner).await {
                return;
            }
        }
        delete(client, item, uid, live.resource_version(), PropagationPolicy::Background).await;
        return;
    }
    if !item.deleting {
        return;
    }
    let dependents = graph.dependents_of(uid);
    if item.finalizers.iter().any(|f| f == ORPHAN) {
        for d in &dependents {
            let Some(dep) = graph.items.get(d) else { continue };
            rewrite_owner_references(client, dep, |refs| refs.iter().filter(|r| r.uid != uid).cloned().collect()).await;
        }
        set_finalizers(client, item, item.finalizers.iter().filter(|f| *f != ORPHAN).cloned().collect()).await;
    } else if item.finalizers.iter().any(|f| f == FOREGROUND) {
        let blocking: Vec<(&String, &Item)> = dependents
            .iter()
            .filter_map(|d| graph.items.get(d).map(|dep| (d, dep)))
            .filter(|(_, dep)| dep.blocking.iter().any(|o| o == uid))
            .collect();
        if blocking.is_empty() {
            set_finalizers(client, item, item.finalizers.iter().filter(|f| *f != FOREGROUND).cloned().collect()).await;
            return;
        }
        for (d, dep) in blocking {
            // Decided on the live dependent: an owner added since the event the graph
            // holds (a second owner given just before this deletion) must count.
            let live = match api_for(client, dep).get(&dep.name).await {
                Ok(obj) if obj.uid().as_deref() == Some(d.as_str()) => obj,
                _ => continue,
            };
            // Another owner still holds it: it stays, without its references to the
            // owners being deleted (upstream's "solid" owner).
            let mut solid = false;
            for owner in live.owner_references().iter().filter(|o| o.uid != uid) {
                solid = match graph.items.get(&owner.uid) {
                    Some(known) => !known.deleting,
                    None => !owner_gone(client, kinds, dep.namespace.as_deref(), owner).await,
                };
                if solid {
                    break;
                }
            }
            if solid {
                let waiting = |r: &OwnerReference| r.uid == uid || graph.items.get(&r.uid).is_some_and(|o| o.deleting);
                rewrite_owner_references(client, dep, |refs| refs.iter().filter(|r| !waiting(r)).cloned().collect())
                    .await;
                continue;
            }
            if graph.has_dependent_waiting(d) {
                let unblocked = |r: &OwnerReference| OwnerReference {
                    block_owner_deletion: r.block_owner_deletion.map(|_| false),
                    ..r.clone()
                };
                rewrite_owner_references(client, dep, |refs| refs.iter().map(unblocked).collect()).await;
            }
            if !dep.deleting {
                delete(client, dep, d, live.resource_version(), PropagationPolicy::Foreground).await;
            }
        }
    }
}

fn item_of(resource: &ApiResource, namespaced: bool, meta: &ObjectMeta) -> Item {
    Item {
        resource: resource.clone(),
        namespaced,
        namespace: meta.namespace.clone(),
        name: meta.name.clone().unwrap_or_default(),
        owners: meta.owner_references.iter().flatten().map(|r| r.uid.clone()).collect(),
        blocking: meta
            .owner_references
            .iter()
            .flatten()
            .filter(|r| r.block_owner_deletion == Some(true))
            .map(|r| r.uid.clone())
            .collect(),
        deleting: meta.deletion_timestamp.is_some(),
        finalizers: meta.finalizers.clone().unwrap_or_default(),
    }
}

/// Applies one change to the graph and notes which objects need a look.
fn absorb(change: Change, graph: &mut Graph, pending: &mut HashSet<String>, caches: &Caches) {
    let touched_owners = match change {
        Change::Seen(item, uid) => {
            let owners = item.owners.clone();
            graph.insert(uid.clone(), *item);
            pending.insert(uid);
            owners
        }
        Change::Gone(uid) => {
            pending.remove(&uid);
            pending.extend(graph.dependents_of(&uid));
            graph.remove(&uid).map(|i| i.owners).unwrap_or_default()
        }
        Change::Synced(name) => {
            caches.mark_synced(&name);
            vec![]
        }
    };
    // An owner waiting for its dependents (foreground deletion) needs another look.
    pending.extend(touched_owners.into_iter().filter(|o| graph.items.get(o).is_some_and(|i| i.deleting)));
}

/// Pods come from the process's shared pod watch rather than from a watch of their own.
async fn feed_pods(pods: Informer<Pod>, resource: ApiResource, tx: mpsc::UnboundedSender<Change>) {
    pods.synced().await;
    let store = pods.store();
    // A change names the pod; the store says whether it is still there (same uid).
    let change = |pod: Arc<Pod>| match store.get(&ObjectRef::from_obj(&*pod)).filter(|live| live.uid() == pod.uid()) {
        Some(live) => Change::Seen(Box::new(item_of(&resource, true, &live.metadata)), live.uid().unwrap_or_default()),
        None => Change::Gone(pod.uid().unwrap_or_default()),
    };
    let mut changes = pods.subscribe();
    // Subscribing queued every known pod: those make up the initial list.
    while let Ok(pod) = changes.try_recv() {
        if tx.send(change(pod)).is_err() {
            return;
        }
    }
    if tx.send(Change::Synced(cache_name(&resource))).is_err() {
        return;
    }
    while let Some(pod) = changes.next().await {
        if tx.send(change(pod)).is_err() {
            return;
        }
    }
}

/// Follows one resource's objects (metadata only: that is all the collector reads).
async fn feed(client: kube::Client, resource: ApiResource, namespaced: bool, tx: mpsc::UnboundedSender<Change>) {
    let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(client, &resource);
    let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut synced = false;
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(Event::Apply(obj)) | Ok(Event::InitApply(obj)) => {
                Change::Seen(Box::new(item_of(&resource, namespaced, &obj.metadata)), obj.uid().unwrap_or_default())
            }
            Ok(Event::Delete(obj)) => Change::Gone(obj.uid().unwrap_or_default()),
            Ok(Event::InitDone) if !synced => {
                synced = true;
                Change::Synced(cache_name(&resource))
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(resource = %cache_name(&resource), error = %e, "garbage collector watch error");
                continue;
            }
        };
        if tx.send(change).is_err() {
            return;
        }
    }
}

/// `plural.group` (`pods` for the core group), as upstream names resources in logs.
fn cache_name(resource: &ApiResource) -> String {
    if resource.group.is_empty() {
        resource.plural.clone()
    } else {
        format!("{}.{}", resource.plural, resource.group)
    }
}

/// Upstream's collector ignores events: they have no dependents and are many.
fn ignored(resource: &ApiResource) -> bool {
    resource.plural == "events" && (resource.group.is_empty() || resource.group == "events.k8s.io")
}

/// Runs discovery and starts a watch for every watchable, deletable resource not yet
/// followed; refreshes the kinds owners are looked up by.
async fn discover(
    client: &kube::Client,
    pods: &Informer<Pod>,
    caches: &Caches,
    kinds: &mut Kinds,
    tx: &mpsc::UnboundedSender<Change>,
) -> anyhow::Result<()> {
    let discovery = Discovery::new(client.clone()).run().await?;
    for group in discovery.groups() {
        for version in group.versions() {
            for (resource, caps) in group.versioned_resources(version) {
                kinds.insert(
                    (resource.api_version.clone(), resource.kind.clone()),
                    (resource, caps.scope == Scope::Namespaced),
                );
            }
        }
        for (resource, caps) in group.recommended_resources() {
            let followed = caps.supports_operation(verbs::WATCH) && caps.supports_operation(verbs::DELETE);
            let name = cache_name(&resource);
            if !followed || ignored(&resource) || caches.contains(&name) {
                continue;
            }
            caches.add([name.clone()]);
            tracing::debug!(resource = %name, "garbage collector follows a resource");
            if resource.group.is_empty() && resource.plural == "pods" {
                tokio::spawn(feed_pods(pods.clone(), resource, tx.clone()));
            } else {
                let namespaced = caps.scope == Scope::Namespaced;
                tokio::spawn(feed(client.clone(), resource, namespaced, tx.clone()));
            }
        }
    }
    Ok(())
}

pub async fn run(client: kube::Client, pods: Informer<Pod>) -> anyhow::Result<()> {
    let caches = Caches::new("garbagecollector", Vec::<String>::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut kinds = Kinds::new();
    discover(&client, &pods, &caches, &mut kinds, &tx).await?;
    let mut rediscovery = tokio::time::interval_at(tokio::time::Instant::now() + REDISCOVERY, REDISCOVERY);
    let mut graph = Graph::default();
    let mut pending: HashSet<String> = HashSet::new();
    loop {
        let change = tokio::select! {
            change = rx.recv() => change.expect("the collector holds a sender"),
            _ = rediscovery.tick() => {
                if let Err(e) = discover(&client, &pods, &caches, &mut kinds, &tx).await {
                    tracing::warn!(error = %format!("{e:#}"), "garbage collector discovery failed; trying again later");
                }
                continue;
            }
        };
        absorb(change, &mut graph, &mut pending, &caches);
        if !caches.all_synced() {
            continue;
        }
        while let Ok(change) = rx.try_recv() {
            absorb(change, &mut graph, &mut pending, &caches);
        }
        for uid in std::mem::take(&mut pending) {
            process(&client, &kinds, &graph, &uid).await;
        }
    }
}
