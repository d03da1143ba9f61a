//! Garbage collector: follows ownerReferences across every deletable resource.
//! - A dependent whose owners are all gone is deleted (background propagation).
//! - An owner deleted with `propagationPolicy=Foreground` (finalizer
//!   `foregroundDeletion`) has its dependents deleted first, then loses the finalizer.
//! - An owner deleted with `Orphan` (finalizer `orphan`) has its references removed
//!   from its dependents, then loses the finalizer.
//!
//! Event-driven: one watch per resource feeds an in-memory graph; nothing acts before
//! every watch has listed once, so a missing owner is never a not-yet-seen one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::discovery::{verbs, Discovery, Scope};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::mpsc;

use crate::informer::Informer;

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
    deleting: bool,
    finalizers: Vec<String>,
}

enum Change {
    Seen(Box<Item>, String),
    Gone(String),
    Synced,
}

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
}

fn api_for(client: &kube::Client, item: &Item) -> Api<DynamicObject> {
    match (&item.namespace, item.namespaced) {
        (Some(ns), true) => Api::namespaced_with(client.clone(), ns, &item.resource),
        _ => Api::all_with(client.clone(), &item.resource),
    }
}

async fn delete(client: &kube::Client, item: &Item, uid: &str, policy: PropagationPolicy) {
    let params = DeleteParams { propagation_policy: Some(policy), preconditions: Some(kube::api::Preconditions { uid: Some(uid.to_string()), resource_version: None }), ..Default::default() };
    match api_for(client, item).delete(&item.name, &params).await {
        Ok(_) => tracing::debug!(kind = %item.resource.kind, name = %item.name, "garbage collected"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(kind = %item.resource.kind, name = %item.name, error = %e, "garbage collection failed"),
    }
}

async fn set_finalizers(client: &kube::Client, item: &Item, finalizers: Vec<String>) {
    let patch = Patch::Merge(json!({"metadata": {"finalizers": finalizers}}));
    if let Err(e) = api_for(client, item).patch(&item.name, &PatchParams::default(), &patch).await {
        tracing::debug!(name = %item.name, error = %e, "updating finalizers failed");
    }
}

/// Acts on one object given the current graph.
async fn process(client: &kube::Client, graph: &Graph, uid: &str) {
    let Some(item) = graph.items.get(uid) else { return };
    // Owners all gone: collect (unless the object is already going).
    if !item.owners.is_empty() && !item.deleting && item.owners.iter().all(|o| !graph.items.contains_key(o)) {
        // Decide on the live object: its references may have changed (orphaning)
        // after the event the graph holds.
        let live = match api_for(client, item).get(&item.name).await {
            Ok(obj) if obj.uid().as_deref() == Some(uid) => obj,
            _ => return,
        };
        let owners: Vec<String> = live.owner_references().iter().map(|r| r.uid.clone()).collect();
        if !owners.is_empty() && owners.iter().all(|o| !graph.items.contains_key(o)) {
            delete(client, item, uid, PropagationPolicy::Background).await;
        }
        return;
    }
    if !item.deleting {
        return;
    }
    let dependents = graph.dependents_of(uid);
    if item.finalizers.iter().any(|f| f == ORPHAN) {
        for d in &dependents {
            let Some(dep) = graph.items.get(d) else { continue };
            let api = api_for(client, dep);
            if let Ok(obj) = api.get(&dep.name).await {
                let refs: Vec<_> = obj.owner_references().iter().filter(|r| r.uid != uid).cloned().collect();
                let _ = api.patch(&dep.name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"ownerReferences": refs}}))).await;
            }
        }
        set_finalizers(client, item, item.finalizers.iter().filter(|f| *f != ORPHAN).cloned().collect()).await;
    } else if item.finalizers.iter().any(|f| f == FOREGROUND) {
        if dependents.is_empty() {
            set_finalizers(client, item, item.finalizers.iter().filter(|f| *f != FOREGROUND).cloned().collect()).await;
            return;
        }
        for d in &dependents {
            if let Some(dep) = graph.items.get(d).filter(|dep| !dep.deleting) {
                delete(client, dep, d, PropagationPolicy::Foreground).await;
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
        deleting: meta.deletion_timestamp.is_some(),
        finalizers: meta.finalizers.clone().unwrap_or_default(),
    }
}

/// Applies one change to the graph and notes which objects need a look.
fn absorb(change: Change, graph: &mut Graph, pending: &mut HashSet<String>, synced: &mut usize) {
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
        Change::Synced => {
            *synced += 1;
            vec![]
        }
    };
    // An owner waiting for its dependents (foreground deletion) needs another look.
    pending.extend(touched_owners.into_iter().filter(|o| graph.items.get(o).is_some_and(|i| i.deleting)));
}

/// Pods come from the process's shared pod watch rather than from a watch of their own.
async fn feed_pods(pods: Informer<Pod>, resource: ApiResource, tx: mpsc::UnboundedSender<Change>) {
    let store = pods.store();
    if store.wait_until_ready().await.is_err() {
        return;
    }
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
    if tx.send(Change::Synced).is_err() {
        return;
    }
    while let Some(pod) = changes.next().await {
        if tx.send(change(pod)).is_err() {
            return;
        }
    }
}

/// Upstream's collector ignores events: they have no dependents and are many.
fn ignored(resource: &ApiResource) -> bool {
    resource.plural == "events" && (resource.group.is_empty() || resource.group == "events.k8s.io")
}

pub async fn run(client: kube::Client, pods: Informer<Pod>) -> anyhow::Result<()> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watches = 0;
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            if !(caps.supports_operation(verbs::WATCH) && caps.supports_operation(verbs::DELETE)) || ignored(&resource) {
                continue;
            }
            watches += 1;
            if resource.group.is_empty() && resource.plural == "pods" {
                tokio::spawn(feed_pods(pods.clone(), resource, tx.clone()));
                continue;
            }
            let (client, tx) = (client.clone(), tx.clone());
            let namespaced = caps.scope == Scope::Namespaced;
            tokio::spawn(async move {
                // Metadata is all the collector reads.
                let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(client, &resource);
                let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
                let mut synced = false;
                while let Some(event) = events.next().await {
                    let change = match event {
                        Ok(Event::Apply(obj)) | Ok(Event::InitApply(obj)) => Change::Seen(Box::new(item_of(&resource, namespaced, &obj.metadata)), obj.uid().unwrap_or_default()),
                        Ok(Event::Delete(obj)) => Change::Gone(obj.uid().unwrap_or_default()),
                        Ok(Event::InitDone) if !synced => {
                            synced = true;
                            Change::Synced
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::debug!(resource = %resource.plural, error = %e, "garbage collector watch error");
                            continue;
                        }
                    };
                    if tx.send(change).is_err() {
                        return;
                    }
                }
            });
        }
    }
    drop(tx);
    let mut graph = Graph::default();
    let mut synced = 0;
    let mut pending: HashSet<String> = HashSet::new();
    while let Some(change) = rx.recv().await {
        absorb(change, &mut graph, &mut pending, &mut synced);
        if synced < watches {
            continue;
        }
        while let Ok(change) = rx.try_recv() {
            absorb(change, &mut graph, &mut pending, &mut synced);
        }
        for uid in std::mem::take(&mut pending) {
            process(&client, &graph, &uid).await;
        }
    }
    Ok(())
}
