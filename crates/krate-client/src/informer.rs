//! One watch of a kind shared by every controller of the process, as client-go's shared
//! informers: pods change more than anything else, and ten controllers each decoding
//! every pod event cost the server a third of its pod throughput.
//!
//! Subscribers get a stream of changed objects (the last state of deleted ones too,
//! unlike kube-rs's shared reflector, which drops deletions): first everything already
//! known, then each change. After a re-list every object is sent again, along with the
//! objects that vanished while the watch was down.
//!
//! Controllers read what they act on from the store rather than listing it from the API
//! on every reconcile, through two indexes kept with it: by namespace, and by the uid
//! of the controlling owner (what a ReplicaSet, Job or DaemonSet owns).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::channel::mpsc;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;

pub trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}
impl<K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static> Watched for K {}

#[derive(Clone)]
pub struct Informer<K: Watched> {
    store: Store<K>,
    hub: Arc<Mutex<Hub<K>>>,
    /// Whether the first list is in; a `watch` wakes every waiter (see [`crate::caches`]).
    synced: Arc<tokio::sync::watch::Sender<bool>>,
}

struct Hub<K: Watched> {
    writer: reflector::store::Writer<K>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<K>>>,
    /// What the store held when a re-list began, to find what vanished meanwhile.
    before_relist: Vec<Arc<K>>,
    by_namespace: Index<K>,
    by_controller: Index<K>,
}

/// Objects by a key of theirs.
struct Index<K: Watched> {
    key: fn(&K) -> Option<String>,
    entries: HashMap<String, HashSet<ObjectRef<K>>>,
}

impl<K: Watched> Index<K> {
    fn new(key: fn(&K) -> Option<String>) -> Self {
        Self { key, entries: HashMap::new() }
    }

    fn insert(&mut self, obj: &K) {
        if let Some(key) = (self.key)(obj) {
            self.entries.entry(key).or_default().insert(ObjectRef::from_obj(obj));
        }
    }

    fn remove(&mut self, obj: &K) {
        let Some(key) = (self.key)(obj) else { return };
        if let Some(refs) = self.entries.get_mut(&key) {
            refs.remove(&ObjectRef::from_obj(obj));
            if refs.is_empty() {
                self.entries.remove(&key);
            }
        }
    }

    fn rebuild(&mut self, objects: &[Arc<K>]) {
        self.entries.clear();
        for obj in objects {
            self.insert(obj);
        }
    }
}

/// The uid of the object's controlling owner.
pub fn controller_uid<K: Resource>(obj: &K) -> Option<String> {
    obj.meta().owner_references.as_ref()?.iter().find(|r| r.controller == Some(true)).map(|r| r.uid.clone())
}

impl<K: Watched> Default for Informer<K> {
    fn default() -> Self {
        let (store, writer) = reflector::store();
        let hub = Hub {
            writer,
            subscribers: Vec::new(),
            before_relist: Vec::new(),
            by_namespace: Index::new(|o: &K| o.meta().namespace.clone()),
            by_controller: Index::new(controller_uid),
        };
        Self { store, hub: Arc::new(Mutex::new(hub)), synced: Arc::new(tokio::sync::watch::Sender::new(false)) }
    }
}

impl<K: Watched> Informer<K> {
    /// The objects as last seen, complete once [`Self::synced`] has returned. Never wait
    /// on this store's `wait_until_ready` (nor hand it, unsynced, to a kube-rs
    /// `Controller`, which does): with several tasks waiting, some never wake.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Waits until the first list is in. Use this rather than the store's
    /// `wait_until_ready`, which may never wake a task when several wait.
    pub async fn synced(&self) {
        let _ = self.synced.subscribe().wait_for(|synced| *synced).await;
    }

    /// The objects in a namespace, as last seen.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        self.indexed(|hub| &hub.by_namespace, namespace)
    }

    /// The objects whose controlling owner has this uid, as last seen.
    pub fn controlled_by(&self, uid: &str) -> Vec<Arc<K>> {
        self.indexed(|hub| &hub.by_controller, uid)
    }

    fn indexed(&self, index: fn(&Hub<K>) -> &Index<K>, key: &str) -> Vec<Arc<K>> {
        let hub = self.hub.lock().expect("informer lock");
        let refs = index(&hub).entries.get(key);
        refs.into_iter().flatten().filter_map(|r| self.store.get(r)).collect()
    }

    /// Every object known now, then every change.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Arc<K>> {
        let (tx, rx) = mpsc::unbounded();
        let mut hub = self.hub.lock().expect("informer lock");
        for obj in self.store.state() {
            let _ = tx.unbounded_send(obj);
        }
        hub.subscribers.push(tx);
        rx
    }

    /// Watches `api` and feeds the store and the subscribers; returns only if the watch ends.
    pub async fn run(&self, api: Api<K>) -> anyhow::Result<()> {
        let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => self.dispatch(event),
                Err(e) => tracing::warn!(kind = %K::kind(&()), error = %e, "shared watch failed; retrying"),
            }
        }
        anyhow::bail!("the shared {} watch ended", K::kind(&()))
    }

    /// Applies one watch event (what `run` does with each; tests feed events directly).
    pub fn apply(&self, event: Event<K>) {
        self.dispatch(event)
    }

    fn dispatch(&self, event: Event<K>) {
        let mut hub = self.hub.lock().expect("informer lock");
        if matches!(event, Event::Init) {
            hub.before_relist = self.store.state();
        }
        let previous = match &event {
            Event::Apply(obj) | Event::Delete(obj) => self.store.get(&ObjectRef::from_obj(obj)),
            _ => None,
        };
        if let Some(previous) = &previous {
            hub.by_namespace.remove(previous);
            hub.by_controller.remove(previous);
        }
        hub.writer.apply_watcher_event(&event);
        let changed: Vec<Arc<K>> = match event {
            Event::Apply(obj) => {
                hub.by_namespace.insert(&obj);
                hub.by_controller.insert(&obj);
                self.store.get(&ObjectRef::from_obj(&obj)).into_iter().collect()
            }
            Event::Delete(obj) => vec![Arc::new(obj)],
            Event::Init | Event::InitApply(_) => return,
            Event::InitDone => {
                let now = self.store.state();
                let present: HashSet<ObjectRef<K>> = now.iter().map(|o| ObjectRef::from_obj(&**o)).collect();
                let vanished: Vec<Arc<K>> = std::mem::take(&mut hub.before_relist)
                    .into_iter()
                    .filter(|o| !present.contains(&ObjectRef::from_obj(&**o)))
                    .collect();
                hub.by_namespace.rebuild(&now);
                hub.by_controller.rebuild(&now);
                self.synced.send_replace(true);
                now.into_iter().chain(vanished).collect()
            }
        };
        hub.subscribers.retain(|tx| changed.iter().all(|obj| tx.unbounded_send(obj.clone()).is_ok()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(name: &str, rv: &str) -> Pod {
        serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}),
        )
        .unwrap()
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Arc<Pod>>) -> Vec<(String, String)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| (p.metadata.name.clone().unwrap(), p.metadata.resource_version.clone().unwrap()))
            .collect()
    }

    #[test]
    fn subscribers_see_the_state_then_changes_and_deletions() {
        let informer = Informer::<Pod>::default();
        informer.dispatch(Event::Init);
        informer.dispatch(Event::InitApply(pod("a", "1")));
        informer.dispatch(Event::InitApply(pod("b", "2")));
        let mut early = informer.subscribe();
        assert!(drain(&mut early).is_empty(), "nothing is known before the list is done");
        informer.dispatch(Event::InitDone);
        let mut seen = drain(&mut early);
        seen.sort();
        assert_eq!(seen, [("a".into(), "1".into()), ("b".into(), "2".into())]);

        let mut late = informer.subscribe();
        assert_eq!(drain(&mut late).len(), 2, "a late subscriber starts from the current state");
        informer.dispatch(Event::Apply(pod("a", "3")));
        informer.dispatch(Event::Delete(pod("b", "4")));
        for rx in [&mut early, &mut late] {
            assert_eq!(drain(rx), [("a".into(), "3".into()), ("b".into(), "4".into())]);
        }
        assert_eq!(informer.store().state().len(), 1);
    }

    #[test]
    fn a_relist_reports_objects_that_vanished_meanwhile() {
        let informer = Informer::<Pod>::default();
        for event in [Event::Init, Event::InitApply(pod("a", "1")), Event::InitApply(pod("b", "2")), Event::InitDone] {
            informer.dispatch(event);
        }
        let mut rx = informer.subscribe();
        drain(&mut rx);
        for event in [Event::Init, Event::InitApply(pod("a", "5")), Event::InitDone] {
            informer.dispatch(event);
        }
        let mut seen = drain(&mut rx);
        seen.sort();
        assert_eq!(seen, [("a".into(), "5".into()), ("b".into(), "2".into())]);
    }

    #[tokio::test]
    async fn every_task_waiting_for_the_first_list_wakes() {
        let informer = Informer::<Pod>::default();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let informer = informer.clone();
                tokio::spawn(async move { informer.synced().await })
            })
            .collect();
        tokio::task::yield_now().await;
        for event in [Event::Init, Event::InitApply(pod("a", "1")), Event::InitDone] {
            informer.dispatch(event);
        }
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("a waiter never woke")
                .unwrap();
        }
    }

    fn owned(name: &str, ns: &str, owner: &str) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": ns, "resourceVersion": "1",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": owner, "controller": true}]}}))
        .unwrap()
    }

    fn names(pods: Vec<Arc<Pod>>) -> Vec<String> {
        let mut names: Vec<String> = pods.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn indexes_follow_changes_deletions_and_relists() {
        let informer = Informer::<Pod>::default();
        for event in
            [Event::Init, Event::InitApply(owned("a", "x", "u1")), Event::InitApply(pod("b", "1")), Event::InitDone]
        {
            informer.dispatch(event);
        }
        assert_eq!(names(informer.controlled_by("u1")), ["a"]);
        assert_eq!(names(informer.in_namespace("ns")), ["b"]);
        informer.dispatch(Event::Apply(owned("c", "x", "u1")));
        informer.dispatch(Event::Apply(owned("a", "x", "u2")));
        assert_eq!(names(informer.controlled_by("u1")), ["c"], "a changed owner");
        assert_eq!(names(informer.controlled_by("u2")), ["a"]);
        assert_eq!(names(informer.in_namespace("x")), ["a", "c"]);
        informer.dispatch(Event::Delete(owned("c", "x", "u1")));
        assert!(informer.controlled_by("u1").is_empty());
        for event in [Event::Init, Event::InitApply(owned("d", "y", "u1")), Event::InitDone] {
            informer.dispatch(event);
        }
        assert_eq!(names(informer.controlled_by("u1")), ["d"], "a relist replaces what was indexed");
        assert!(informer.controlled_by("u2").is_empty() && informer.in_namespace("x").is_empty());
    }

    #[test]
    fn closed_subscribers_are_dropped() {
        let informer = Informer::<Pod>::default();
        drop(informer.subscribe());
        informer.dispatch(Event::Apply(pod("a", "1")));
        assert!(informer.hub.lock().unwrap().subscribers.is_empty());
    }
}
