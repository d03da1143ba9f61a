//! One watch of a kind shared by every controller of the process, as client-go's shared
//! informers: pods change more than anything else, and ten controllers each decoding
//! every pod event cost the server a third of its pod throughput.
//!
//! Subscribers get a stream of changed objects (the last state of deleted ones too,
//! unlike kube-rs's shared reflector, which drops deletions): first everything already
//! known, then each change. After a re-list every object is sent again, along with the
//! objects that vanished while the watch was down.

use std::collections::HashSet;
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
}

impl<K: Watched> Default for Informer<K> {
    fn default() -> Self {
        let (store, writer) = reflector::store();
        let hub = Hub { writer, subscribers: Vec::new(), before_relist: Vec::new() };
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

    fn dispatch(&self, event: Event<K>) {
        let mut hub = self.hub.lock().expect("informer lock");
        if matches!(event, Event::Init) {
            hub.before_relist = self.store.state();
        }
        hub.writer.apply_watcher_event(&event);
        let changed: Vec<Arc<K>> = match event {
            Event::Apply(obj) => self.store.get(&ObjectRef::from_obj(&obj)).into_iter().collect(),
            Event::Delete(obj) => vec![Arc::new(obj)],
            Event::Init | Event::InitApply(_) => return,
            Event::InitDone => {
                let now = self.store.state();
                let present: HashSet<ObjectRef<K>> = now.iter().map(|o| ObjectRef::from_obj(&**o)).collect();
                let vanished: Vec<Arc<K>> = std::mem::take(&mut hub.before_relist)
                    .into_iter()
                    .filter(|o| !present.contains(&ObjectRef::from_obj(&**o)))
                    .collect();
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

    #[test]
    fn closed_subscribers_are_dropped() {
        let informer = Informer::<Pod>::default();
        drop(informer.subscribe());
        informer.dispatch(Event::Apply(pod("a", "1")));
        assert!(informer.hub.lock().unwrap().subscribers.is_empty());
    }
}
