//! The scheduler: an API client that watches pods and nodes, and assigns each pending
//! pod (of its `schedulerName`) to the best node that fits, through `pods/binding`.
//!
//! Event-driven: pods are tried when they appear; pods that fit nowhere wait, marked
//! `PodScheduled=False` with a `FailedScheduling` event, until the cluster changes (a
//! node joins or changes, a pod goes away or finishes), never on a timer.

pub mod plugins;
pub mod preemption;
pub mod spread;
pub use krate_api::quantity;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use anyhow::Result;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use krate_client::events::Recorder;

use plugins::{Needs, NodeInfo, NodeUsage, Usage};

pub const DEFAULT_SCHEDULER: &str = "default-scheduler";
/// Bindings in flight at once.
const BIND_CONCURRENCY: usize = 32;

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty())
}

/// What came back from a binding attempt.
enum Outcome {
    Bound,
    /// Binding failed; try the pod again.
    Retry(String),
}

#[derive(Default)]
struct State {
    name: String,
    nodes: BTreeMap<String, Arc<NodeInfo>>,
    /// The nodes in name order for passes, rebuilt only when a node comes, goes or
    /// changes (passes are many and small; nodes change rarely).
    node_list: Option<NodeList>,
    /// Where the next search over nodes starts (spreads work as upstream does).
    next_start: usize,
    pods: HashMap<String, Arc<Pod>>,
    /// Pending pods to try on the next pass.
    active: HashSet<String>,
    /// Pods that fit nowhere, with the message they were marked with.
    unschedulable: HashMap<String, String>,
    /// Pods bound by us whose binding the watch has not shown yet.
    assumed: HashMap<String, String>,
    /// What is placed on each node, kept up to date as pods change.
    usage: Usage,
    /// The node each counted pod is counted on.
    counted: HashMap<String, String>,
    /// Counted pods that declare required anti-affinity (their rules bind newcomers),
    /// kept here so that a pass need not look through every placed pod.
    anti_holders: HashMap<String, String>,
    pods_synced: bool,
    nodes_synced: bool,
}

impl State {
    fn wants(&self, pod: &Pod) -> bool {
        let spec = pod.spec.as_ref();
        node_of(pod).is_none()
            && pod.metadata.deletion_timestamp.is_none()
            && !is_terminal(pod)
            && spec.and_then(|s| s.scheduler_name.as_deref()).unwrap_or(DEFAULT_SCHEDULER) == self.name
    }

    /// Pending pods a preemption nominated to a node, with the node. Pending pods are
    /// the active and the waiting ones (a waiting pod made active again is both), not
    /// every pod the scheduler follows.
    fn nominated(&self) -> Vec<(String, Arc<Pod>)> {
        let pending: HashSet<&String> = self.active.iter().chain(self.unschedulable.keys()).collect();
        pending
            .into_iter()
            .filter_map(|id| self.pods.get(id))
            .filter(|p| self.wants(p))
            .filter_map(|p| Some((p.status.as_ref()?.nominated_node_name.clone()?, p.clone())))
            .collect()
    }

    /// Something freed or added capacity: every waiting pod gets another try.
    fn cluster_changed(&mut self) {
        let waiting: Vec<String> = self.unschedulable.keys().cloned().collect();
        self.active.extend(waiting);
    }

    fn on_pod(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => {
                self.pods.clear();
                self.usage.clear();
                self.counted.clear();
                self.anti_holders.clear();
            }
            Event::InitDone => self.pods_synced = true,
            Event::Apply(pod) | Event::InitApply(pod) => {
                let id = uid(&pod);
                let was_running = self.pods.get(&id).is_some_and(|old| node_of(old).is_some() && !is_terminal(old));
                if node_of(&pod).is_some() {
                    self.assumed.remove(&id);
                    self.unschedulable.remove(&id);
                    self.active.remove(&id);
                    if was_running && (is_terminal(&pod) || pod.metadata.deletion_timestamp.is_some()) {
                        self.cluster_changed();
                    }
                } else if self.wants(&pod) && !self.unschedulable.contains_key(&id) && !self.assumed.contains_key(&id) {
                    self.active.insert(id.clone());
                }
                self.pods.insert(id.clone(), Arc::new(pod));
                self.account(&id);
            }
            Event::Delete(pod) => {
                let id = uid(&pod);
                self.pods.remove(&id);
                self.active.remove(&id);
                self.unschedulable.remove(&id);
                self.assumed.remove(&id);
                self.account(&id);
                if node_of(&pod).is_some() {
                    self.cluster_changed();
                }
            }
        }
    }

    fn on_node(&mut self, event: Event<Node>) {
        match event {
            Event::Init => {
                self.nodes.clear();
                self.node_list = None;
            }
            Event::InitDone => self.nodes_synced = true,
            Event::Apply(node) | Event::InitApply(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                let changed = self.nodes.get(&name).is_none_or(|old| {
                    let old = &old.node;
                    old.spec != node.spec
                        || old.metadata.labels != node.metadata.labels
                        || allocatable_of(old) != allocatable_of(&node)
                });
                self.nodes.insert(name, Arc::new(NodeInfo::new(node)));
                self.node_list = None;
                if changed {
                    self.cluster_changed();
                }
            }
            Event::Delete(node) => {
                self.nodes.remove(node.metadata.name.as_deref().unwrap_or_default());
                self.node_list = None;
            }
        }
    }

    /// Re-counts pod `id` in the node usage: bound or assumed, and not finished.
    fn account(&mut self, id: &str) {
        self.anti_holders.remove(id);
        if let Some(node) = self.counted.remove(id) {
            if let Some(u) = self.usage.get_mut(&node) {
                u.remove(id);
            }
        }
        let Some(pod) = self.pods.get(id) else { return };
        if is_terminal(pod) {
            return;
        }
        let node = node_of(pod).map(str::to_string).or_else(|| self.assumed.get(id).cloned());
        if let Some(node) = node {
            if plugins::PodTopology::holds_anti_affinity(pod) {
                self.anti_holders.insert(id.to_string(), node.clone());
            }
            self.usage.on(&node).add(pod.clone());
            self.counted.insert(id.to_string(), node);
        }
    }
}

fn allocatable_of(node: &Node) -> Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>> {
    node.status.as_ref().and_then(|s| s.allocatable.as_ref())
}

/// The nodes in name order, and each one's usage slot.
#[derive(Clone)]
struct NodeList {
    nodes: Arc<[Arc<NodeInfo>]>,
    slots: Arc<[usize]>,
}

impl NodeList {
    fn new(nodes: &BTreeMap<String, Arc<NodeInfo>>, usage: &mut Usage) -> Self {
        Self { slots: nodes.keys().map(|name| usage.slot(name)).collect(), nodes: nodes.values().cloned().collect() }
    }
}

/// The nodes of one scheduling pass, indexed.
struct Cluster<'a> {
    nodes: Arc<[Arc<NodeInfo>]>,
    slots: Arc<[usize]>,
    by_name: &'a BTreeMap<String, Arc<NodeInfo>>,
    /// Placed pods with required anti-affinity, and their nodes.
    anti_holders: Vec<(String, Arc<Pod>)>,
    /// Pending pods that preempted others, with the node they did it on: room there is
    /// theirs against pods of no higher priority (upstream's nominated pods).
    nominated: Vec<(String, Arc<Pod>)>,
}

impl Cluster<'_> {
    /// What `node` holds as `pod` must see it: its placed pods, and the pods nominated
    /// to it that are at least as important as `pod`.
    fn usage_for<'u>(&self, pod: &Pod, node: &str, placed: &'u NodeUsage) -> std::borrow::Cow<'u, NodeUsage> {
        let mine = preemption::priority(pod);
        let mut ahead = self
            .nominated
            .iter()
            .filter(|(n, p)| n == node && p.metadata.uid != pod.metadata.uid && preemption::priority(p) >= mine)
            .peekable();
        if ahead.peek().is_none() {
            return std::borrow::Cow::Borrowed(placed);
        }
        let mut usage = placed.clone();
        for (_, p) in ahead {
            usage.add(p.clone());
        }
        std::borrow::Cow::Owned(usage)
    }
}

/// How many feasible nodes to find before scoring: all in small clusters, a share of
/// them in large ones (upstream's adaptive percentageOfNodesToScore).
fn feasible_wanted(nodes: usize) -> usize {
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100).min(nodes)
}

/// Where a pod goes, or why it goes nowhere. The search starts at `start` and wraps.
fn place(
    pod: &Pod,
    cluster: &Cluster,
    usage: &Usage,
    terms: &mut plugins::TermDomains,
    start: usize,
) -> Result<(String, usize), String> {
    let nodes = &cluster.nodes;
    let needs = Needs::of(pod);
    let topology = plugins::PodTopology::new(pod, cluster.by_name, usage, &cluster.anti_holders, terms);
    let spread = spread::Spread::new(pod, nodes, usage);
    let wanted = feasible_wanted(nodes.len());
    let mut reasons = Vec::new();
    let mut best: Option<(f64, &str)> = None;
    let mut found = 0;
    let mut examined = 0;
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        let info = &nodes[i];
        let name = info.node.metadata.name.as_deref().unwrap_or_default();
        let u = usage.at(cluster.slots[i]);
        examined += 1;
        let verdict = plugins::filter(pod, &needs, info, &cluster.usage_for(pod, name, u))
            .or_else(|| if topology.is_trivial() { None } else { topology.filter(&info.node) })
            .or_else(|| if spread.is_trivial() { None } else { spread.filter(&info.node) });
        match verdict {
            Some(reason) => reasons.push(reason),
            None => {
                found += 1;
                let s = plugins::score(pod, &needs, info, u)
                    + if spread.is_trivial() { 0.0 } else { spread.score(&info.node) };
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, name));
                }
                if found >= wanted {
                    break;
                }
            }
        }
    }
    best.map(|(_, n)| (n.to_string(), examined)).ok_or_else(|| plugins::unschedulable_message(nodes.len(), &reasons))
}

/// What scheduling talks to: the API, and the event recorder.
#[derive(Clone)]
struct Io {
    client: kube::Client,
    events: Recorder,
}

fn pod_reference(pod: &Pod) -> k8s_openapi::api::core::v1::ObjectReference {
    kube::Resource::object_ref(pod, &())
}

/// Binds `pod` to `node` holding a permit of `binds`, then records the Scheduled event
/// without it: bindings, not events, are what the permits ration.
async fn bind(io: Io, binds: Arc<Semaphore>, pod: &Pod, node: String) -> Outcome {
    let permit = binds.acquire_owned().await;
    let client = io.client.clone();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid}, "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    match api
        .create_subresource::<serde_json::Value, serde_json::Value>("binding", &name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => {
            drop(permit);
            io.events
                .normal(&pod_reference(pod), "Scheduled", &format!("Successfully assigned {ns}/{name} to {node}"))
                .await;
            Outcome::Bound
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Outcome::Bound,
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

/// Evicts a plan's victims for `preemptor` and nominates the node for it; the preemptor
/// is tried again when the victims are gone (a cluster change).
async fn preempt(io: &Io, preemptor: &Pod, plan: preemption::Plan) {
    let client = &io.client;
    let preemptor_ns = preemptor.metadata.namespace.clone().unwrap_or_default();
    let preemptor_name = preemptor.metadata.name.clone().unwrap_or_default();
    let nominate = Patch::Merge(json!({"status": {"nominatedNodeName": plan.node}}));
    if let Err(e) = Api::<Pod>::namespaced(client.clone(), &preemptor_ns)
        .patch_status(&preemptor_name, &PatchParams::default(), &nominate)
        .await
    {
        tracing::debug!(error = %e, "nominating a node failed");
    }
    for victim in &plan.victims {
        let api: Api<Pod> = Api::namespaced(client.clone(), victim.metadata.namespace.as_deref().unwrap_or_default());
        let name = victim.metadata.name.clone().unwrap_or_default();
        let now = krate_client::now();
        let condition = json!({"status": {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
            "message": format!("{DEFAULT_SCHEDULER}: preempting to accommodate a higher priority pod"), "lastTransitionTime": now}]}});
        let _ = api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(condition)).await;
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {
                tracing::info!(victim = %name, preemptor = %preemptor_name, node = %plan.node, "preempted a lower-priority pod");
                let message = format!(
                    "Preempted by pod {} on node {}",
                    preemptor.metadata.uid.as_deref().unwrap_or_default(),
                    plan.node
                );
                io.events.normal(&pod_reference(victim), "Preempted", &message).await;
            }
            Err(e) => tracing::debug!(victim = %name, error = %e, "preempting a pod failed"),
        }
    }
}

/// Marks a pod unschedulable (once per distinct reason).
async fn mark_unschedulable(io: &Io, pod: &Pod, message: &str) {
    let client = &io.client;
    let api: Api<Pod> = Api::namespaced(client.clone(), pod.metadata.namespace.as_deref().unwrap_or_default());
    let now = krate_client::now();
    let mut conditions: Vec<serde_json::Value> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().filter(|c| c.type_ != "PodScheduled").filter_map(|c| serde_json::to_value(c).ok()).collect())
        .unwrap_or_default();
    conditions.push(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message, "lastProbeTime": null, "lastTransitionTime": now}));
    let patch = Patch::Merge(json!({"status": {"conditions": conditions}}));
    if let Err(e) =
        api.patch_status(pod.metadata.name.as_deref().unwrap_or_default(), &PatchParams::default(), &patch).await
    {
        tracing::debug!(error = %e, "marking a pod unschedulable failed");
    }
    io.events.warning(&pod_reference(pod), "FailedScheduling", message).await;
}

fn existing_unschedulable_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .and_then(|c| c.message.clone())
}

/// One pass over the active queue: highest priority first, then oldest.
fn schedule_pass(state: &mut State, io: &Io, binds: &Arc<Semaphore>, done: &mpsc::UnboundedSender<(String, Outcome)>) {
    let nominated = state.nominated();
    let mut queue: Vec<Arc<Pod>> = state.active.drain().filter_map(|id| state.pods.get(&id).cloned()).collect();
    queue.sort_by_key(|p| {
        (
            std::cmp::Reverse(p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)),
            p.metadata.creation_timestamp.clone().map(|t| t.0),
        )
    });
    let mut usage = std::mem::take(&mut state.usage);
    let NodeList { nodes, slots } =
        state.node_list.get_or_insert_with(|| NodeList::new(&state.nodes, &mut usage)).clone();
    let mut cluster = Cluster {
        by_name: &state.nodes,
        anti_holders: state
            .anti_holders
            .iter()
            .filter_map(|(id, node)| Some((node.clone(), state.pods.get(id)?.clone())))
            .collect(),
        nominated,
        nodes,
        slots,
    };
    let mut next_start = state.next_start;
    let mut terms = plugins::TermDomains::default();
    let mut assumed = Vec::new();
    let mut unschedulable = Vec::new();
    for pod in queue {
        if !state.wants(&pod) {
            continue;
        }
        let id = uid(&pod);
        if cluster.nodes.is_empty() {
            unschedulable.push((id, pod, plugins::unschedulable_message(0, &[])));
            continue;
        }
        match place(&pod, &cluster, &usage, &mut terms, next_start) {
            Ok((node, examined)) => {
                next_start = (next_start + examined) % cluster.nodes.len();
                terms.placed(&pod, &node, cluster.by_name);
                if plugins::PodTopology::holds_anti_affinity(&pod) {
                    cluster.anti_holders.push((node.clone(), pod.clone()));
                }
                usage.on(&node).add(pod.clone());
                state.counted.insert(id.clone(), node.clone());
                if plugins::PodTopology::holds_anti_affinity(&pod) {
                    state.anti_holders.insert(id.clone(), node.clone());
                }
                assumed.push((id.clone(), node.clone()));
                let (io, binds, done) = (io.clone(), binds.clone(), done.clone());
                tokio::spawn(async move {
                    let outcome = bind(io, binds, &pod, node).await;
                    let _ = done.send((id, outcome));
                });
            }
            Err(message) => {
                if preemption::may_preempt(&pod) {
                    if let Some(plan) = preemption::plan(&pod, &cluster.nodes, &usage).filter(|p| !p.victims.is_empty())
                    {
                        let (io, preemptor) = (io.clone(), pod.clone());
                        tokio::spawn(async move { preempt(&io, &preemptor, plan).await });
                    }
                }
                unschedulable.push((id, pod, message));
            }
        }
    }
    state.next_start = next_start;
    state.usage = usage;
    state.assumed.extend(assumed);
    for (id, pod, message) in unschedulable {
        let already = existing_unschedulable_message(&pod).as_deref() == Some(message.as_str());
        state.unschedulable.insert(id, message.clone());
        if !already {
            let io = io.clone();
            tokio::spawn(async move { mark_unschedulable(&io, &pod, &message).await });
        }
    }
}

/// Schedules pods for `scheduler_name` until the watches end.
pub async fn run(client: kube::Client, scheduler_name: &str) -> Result<()> {
    let mut pods =
        watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff().boxed();
    let mut nodes =
        watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).default_backoff().boxed();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Outcome)>();
    let binds = Arc::new(Semaphore::new(BIND_CONCURRENCY));
    let io = Io { client: client.clone(), events: Recorder::new(client.clone(), scheduler_name) };
    let mut state = State { name: scheduler_name.to_string(), ..Default::default() };
    let caches = krate_client::caches::Caches::new(format!("scheduler/{scheduler_name}"), ["pods", "nodes"]);
    loop {
        tokio::select! {
            // A failed watch is retried by the watcher (with back-off) and re-lists.
            ev = pods.next() => match ev {
                Some(Ok(e)) => state.on_pod(e),
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                None => return Ok(()),
            },
            ev = nodes.next() => match ev {
                Some(Ok(e)) => state.on_node(e),
                Some(Err(e)) => tracing::warn!(error = %e, "node watch failed; retrying"),
                None => return Ok(()),
            },
            Some((id, outcome)) = done_rx.recv() => {
                if let Outcome::Retry(err) = outcome {
                    tracing::warn!(pod = %id, error = %err, "binding failed; will retry");
                    state.assumed.remove(&id);
                    state.account(&id);
                    state.active.insert(id);
                }
            }
        }
        // Take everything already delivered before deciding, so one pass sees a batch.
        while let Some(Ok(Some(e))) = pods.try_next().now_or_never() {
            state.on_pod(e);
        }
        while let Some(Ok(Some(e))) = nodes.try_next().now_or_never() {
            state.on_node(e);
        }
        if !caches.all_synced() {
            for (name, synced) in [("pods", state.pods_synced), ("nodes", state.nodes_synced)] {
                if synced {
                    caches.mark_synced(name);
                }
            }
        }
        if state.pods_synced && state.nodes_synced && !state.active.is_empty() {
            schedule_pass(&mut state, &io, &binds, &done_tx);
        }
    }
}

/// Merges JSON `b` into `a` (test fixtures).
#[cfg(test)]
pub(crate) fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cpu: &str, priority: i32) -> Arc<Pod> {
        let pod = json!({"metadata": {"name": name, "uid": name},
            "spec": {"priority": priority, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}});
        Arc::new(serde_json::from_value(pod).unwrap())
    }

    #[test]
    fn room_a_preemptor_was_nominated_to_is_kept_from_less_important_pods() {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": "n"}, "status": {"allocatable": {"cpu": "1", "pods": "110"}}}),
        )
        .unwrap();
        let by_name = BTreeMap::from([("n".to_string(), Arc::new(NodeInfo::new(node)))]);
        let mut usage = Usage::default();
        let list = NodeList::new(&by_name, &mut usage);
        let preemptor = pod("preemptor", "600m", 10);
        let cluster = Cluster {
            nodes: list.nodes,
            slots: list.slots,
            by_name: &by_name,
            anti_holders: Vec::new(),
            nominated: vec![("n".to_string(), preemptor.clone())],
        };
        let mut terms = plugins::TermDomains::default();
        assert!(place(&pod("lower", "500m", 1), &cluster, &usage, &mut terms, 0).is_err(), "the room is reserved");
        assert!(place(&pod("small", "300m", 1), &cluster, &usage, &mut terms, 0).is_ok(), "what is left is not");
        assert!(place(&pod("higher", "500m", 20), &cluster, &usage, &mut terms, 0).is_ok(), "a more important pod");
        assert!(place(&preemptor, &cluster, &usage, &mut terms, 0).is_ok(), "the preemptor itself");
    }
}
