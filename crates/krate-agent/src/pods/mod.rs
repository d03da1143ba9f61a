//! The pods of this node: a watch on the pods bound to it, and the static pod manifests
//! (`manifests.rs`), feed one worker task per pod (`worker.rs`); containerd's task
//! events wake the worker that owns the container. After each (re)list, sandboxes of
//! pods neither source has are removed.

pub mod admission;
mod certificates;
pub mod dns;
mod env;
pub mod manifests;
mod probe;
pub mod spec;
pub mod status;
pub mod volumes;
mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::{watch, Notify};

use crate::cri::Cri;

struct WorkerHandle {
    pod: watch::Sender<Option<Arc<Pod>>>,
    wake: Arc<Notify>,
    /// Set when the pod's status must be written even if unchanged (a new mirror pod).
    republish: Arc<AtomicBool>,
    stop: Arc<Mutex<Option<worker::StopRequest>>>,
}

/// What every pod worker shares.
pub struct Shared {
    pub client: kube::Client,
    pub cri: Cri,
    pub node_name: String,
    pub node_ip: String,
    /// The node's allocatable resources: what a container without limits is limited to
    /// as the downward API reports it.
    pub allocatable: BTreeMap<String, String>,
    /// Container logs: `<log_root>/<ns>_<name>_<uid>/<container>/<restarts>.log`.
    pub log_root: PathBuf,
    /// Pod volumes: `<volume_root>/<uid>/<volume>`.
    pub volume_root: PathBuf,
    /// How often volumes that follow API objects (ConfigMaps, Secrets) are refreshed.
    pub sync_frequency: std::time::Duration,
    pub events: krate_client::events::Recorder,
    workers: Mutex<HashMap<String, WorkerHandle>>,
    /// Runtime container and sandbox IDs → the UID of the pod they belong to.
    owners: Mutex<HashMap<String, String>>,
    /// Containers whose exit containerd announced and CRI may not have recorded yet.
    exits: Mutex<HashSet<String>>,
    /// UIDs of the static pods running (their workers are not the API watch's).
    statics: Mutex<HashSet<String>>,
    /// The API showed a mirror pod deleted or being deleted.
    mirrors_changed: Notify,
    /// The node's pressure conditions now true (new pods are rejected under some).
    pub conditions: watch::Receiver<Vec<crate::pressure::Condition>>,
    /// The node is shutting down: no new pods; the heartbeat reports it not ready.
    pub shutting_down: watch::Sender<bool>,
    /// Pods' resolv.conf and hosts files.
    pub dns: dns::PodDns,
    /// The node's networking view, where pods' host ports go.
    pub catalog: krate_net::catalog::Catalog,
    /// The host ports running pods hold (a new pod asking for one is refused).
    pub host_ports: admission::HostPortClaims,
}

impl Shared {
    /// `dir`: the agent's directory, which holds pod logs and volumes.
    pub fn new(
        client: kube::Client,
        cri: Cri,
        node: &crate::node::NodeSettings,
        sync_frequency: std::time::Duration,
        conditions: watch::Receiver<Vec<crate::pressure::Condition>>,
        dns: dns::PodDns,
        catalog: krate_net::catalog::Catalog,
    ) -> Arc<Self> {
        let events = krate_client::events::Recorder::new(client.clone(), "kubelet");
        let dir = &node.data_dir;
        let (log_root, volume_root) = (dir.join("pods"), dir.join("volumes"));
        Arc::new(Shared {
            client,
            cri,
            node_name: node.name.clone(),
            node_ip: node.ip.to_string(),
            allocatable: crate::node::allocatable(node),
            log_root,
            volume_root,
            sync_frequency,
            events,
            workers: Mutex::default(),
            owners: Mutex::default(),
            exits: Mutex::default(),
            statics: Mutex::default(),
            mirrors_changed: Notify::new(),
            conditions,
            shutting_down: watch::Sender::new(false),
            dns,
            catalog,
            host_ports: Default::default(),
        })
    }

    fn own(&self, id: &str, uid: &str) {
        self.owners.lock().unwrap().insert(id.to_string(), uid.to_string());
    }

    fn disown(&self, id: &str) {
        self.owners.lock().unwrap().remove(id);
        self.exits.lock().unwrap().remove(id);
    }

    /// Whether containerd said `id` exited while CRI still reports it running; `seen`
    /// (CRI reports the exit) clears it.
    fn exit_pending(&self, id: &str, seen: bool) -> bool {
        let mut exits = self.exits.lock().unwrap();
        if seen {
            exits.remove(id);
            return false;
        }
        exits.contains(id)
    }

    fn forget_worker(&self, uid: &str) {
        self.workers.lock().unwrap().remove(uid);
    }

    /// Hands the pod's latest version to its worker, starting one if needed.
    fn dispatch(self: &Arc<Self>, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut workers = self.workers.lock().unwrap();
        if let Some(w) = workers.get(&uid) {
            w.pod.send_replace(Some(Arc::new(pod)));
            return;
        }
        let (tx, rx) = watch::channel(Some(Arc::new(pod)));
        let wake = Arc::new(Notify::new());
        let republish = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(Mutex::new(None));
        workers.insert(
            uid.clone(),
            WorkerHandle { pod: tx, wake: wake.clone(), republish: republish.clone(), stop: stop.clone() },
        );
        tokio::spawn(worker::PodWorker::new(self.clone(), uid, rx, wake, republish, stop).run());
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutting_down.borrow()
    }

    /// Has the workers of the pods `which` selects stop them within `grace` (the node
    /// shuts down); returns how many were asked and a future that ends when all have.
    pub fn stop_pods(
        &self,
        which: impl Fn(&Pod) -> bool,
        grace: std::time::Duration,
    ) -> (usize, impl std::future::Future<Output = ()>) {
        let mut waits = Vec::new();
        for w in self.workers.lock().unwrap().values() {
            let selected = w.pod.borrow().as_ref().is_some_and(|p| p.metadata.deletion_timestamp.is_none() && which(p));
            if selected {
                let (done, wait) = tokio::sync::oneshot::channel();
                *w.stop.lock().unwrap() = Some(worker::StopRequest { grace, done });
                w.wake.notify_one();
                waits.push(wait);
            }
        }
        (waits.len(), async move {
            futures::future::join_all(waits).await;
        })
    }

    /// Has the pod's worker write its status again, changed or not.
    fn republish(&self, uid: &str) {
        if let Some(w) = self.workers.lock().unwrap().get(uid) {
            w.republish.store(true, Ordering::Relaxed);
            w.wake.notify_one();
        }
    }

    /// The pod left the API: its worker tears it down.
    fn gone(&self, uid: &str) {
        if let Some(w) = self.workers.lock().unwrap().get(uid) {
            w.pod.send_replace(None);
        }
    }

    fn wake_owner_of(&self, id: &str) {
        let uid = self.owners.lock().unwrap().get(id).cloned();
        if let Some(w) = uid.and_then(|uid| self.workers.lock().unwrap().get(&uid).map(|w| w.wake.clone())) {
            w.notify_one();
        }
    }

    /// Removes sandboxes (and their containers) of pods this agent has no worker for.
    async fn remove_orphans(&self) -> Result<()> {
        let mut cri = self.cri.clone();
        let sandboxes = cri.sandboxes_labelled(&[(spec::MANAGED_BY, spec::MANAGED_BY_AGENT)]).await?;
        let known: HashSet<String> = self.workers.lock().unwrap().keys().cloned().collect();
        for s in sandboxes {
            let uid = s.labels.get(spec::POD_UID).cloned().unwrap_or_default();
            if known.contains(&uid) {
                continue;
            }
            tracing::info!(sandbox = %s.id, pod_uid = %uid, "removing the sandbox of a pod that no longer exists");
            let _ = cri.remove_sandbox(&s.id).await;
        }
        Ok(())
    }

    /// Wakes pod workers on containerd's task exits and OOMs; resubscribes if the stream ends.
    async fn follow_runtime_events(self: Arc<Self>) {
        loop {
            match self.cri.task_events(crate::containerd::CRI_NAMESPACE).await {
                Ok(mut stream) => {
                    while let Some(Ok(envelope)) = stream.next().await {
                        if let Some(id) = envelope.container_id() {
                            if envelope.topic == "/tasks/exit" {
                                self.exits.lock().unwrap().insert(id.clone());
                            }
                            self.wake_owner_of(&id);
                        }
                    }
                    tracing::warn!("containerd's event stream ended; subscribing again");
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "subscribing to containerd's events failed; retrying")
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            // Anything may have exited while the stream was down.
            let uids: Vec<Arc<Notify>> = self.workers.lock().unwrap().values().map(|w| w.wake.clone()).collect();
            uids.iter().for_each(|w| w.notify_one());
        }
    }
}

/// Runs the pods bound to this node until the process stops.
/// `manifests`: the static pod directory and how often it is read.
pub async fn run(shared: Arc<Shared>, manifests: (PathBuf, std::time::Duration)) -> Result<()> {
    tokio::spawn(shared.clone().follow_runtime_events());
    tokio::spawn(manifests::run(shared.clone(), manifests.0, manifests.1));
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", shared.node_name));
    // Back-off keeps the agent coasting while the API server is away.
    let mut stream = watcher::watcher(pods, config).default_backoff().boxed();
    let mut listed: HashSet<String> = HashSet::new();
    // Orphaned sandboxes are only removed once the list is in.
    let caches = krate_client::caches::Caches::new("node-agent", ["pods"]);
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(pod) | Event::Apply(pod)) if manifests::is_mirror(&pod) => {
                if pod.metadata.deletion_timestamp.is_some() {
                    shared.mirrors_changed.notify_one();
                }
            }
            Ok(Event::Delete(pod)) if manifests::is_mirror(&pod) => shared.mirrors_changed.notify_one(),
            Ok(Event::InitApply(pod)) => {
                listed.insert(pod.metadata.uid.clone().unwrap_or_default());
                shared.dispatch(pod);
            }
            Ok(Event::InitDone) => {
                caches.mark_synced("pods");
                let known: Vec<String> = shared.workers.lock().unwrap().keys().cloned().collect();
                let statics = shared.statics.lock().unwrap().clone();
                for uid in known.iter().filter(|u| !listed.contains(*u) && !statics.contains(*u)) {
                    shared.gone(uid);
                }
                if let Err(e) = shared.remove_orphans().await {
                    tracing::warn!(error = %format!("{e:#}"), "removing orphaned sandboxes failed");
                }
            }
            Ok(Event::Apply(pod)) => shared.dispatch(pod),
            Ok(Event::Delete(pod)) => shared.gone(pod.metadata.uid.as_deref().unwrap_or_default()),
            Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
        }
    }
    Ok(())
}
