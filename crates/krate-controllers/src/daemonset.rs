//! DaemonSets: one pod per eligible node (node selector, affinity and taints decide,
//! as the scheduler's placement filters do), following nodes as they come and go, and
//! rolling updates that replace at most maxUnavailable pods at a time.
//!
//! Pods are pinned with node affinity on `metadata.name` and placed by the scheduler,
//! as upstream does. Each template the set has had is a ControllerRevision
//! (`<set>-<hash>`, `crate::history`); pods carry their revision's hash, and a pod is up
//! to date when its revision holds the set's template, so a rollback to an earlier
//! template (which moves that revision's number past the others) restarts only the pods
//! the rollout had replaced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::history;
use crate::owned::{OwnedPods, CACHE_LAG_RETRY};
use crate::replicas::is_ready;
use crate::selector::label_selector_string;
use crate::{reference, tolerate, Error, Informer, Recorder};

const HASH_LABEL: &str = "controller-revision-hash";

struct Context {
    client: kube::Client,
    nodes: reflector::Store<Node>,
    events: Recorder,
    pods: OwnedPods,
    /// Per daemon set and node: when a pod that failed there may next be replaced, and
    /// the back-off after that (upstream's failed-pods back-off, 1 s doubling to 15 min).
    failed_backoff: std::sync::Mutex<HashMap<(String, String), (std::time::Instant, Duration)>>,
}

/// The longest wait before a failed daemon pod is replaced.
const FAILED_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

/// Tolerations every daemon pod gets, as upstream adds them.
fn daemon_tolerations() -> Value {
    json!([
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
        {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
    ])
}

/// The pod the DaemonSet runs on `node`.
fn daemon_pod(ds: &DaemonSet, node: &str, hash: &str) -> Result<Pod, Error> {
    let template = serde_json::to_value(&ds.spec.template)?;
    let mut metadata = template.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut spec = template.get("spec").cloned().unwrap_or_default();
    metadata["generateName"] = json!(format!("{}-", ds.name_any()));
    metadata["namespace"] = json!(ds.namespace());
    metadata["labels"][HASH_LABEL] = json!(hash);
    metadata["ownerReferences"] = json!([ds.controller_owner_ref(&()).expect("a stored daemonset has a name and uid")]);
    spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] =
        json!({"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]});
    let mut tolerations = spec.get("tolerations").and_then(Value::as_array).cloned().unwrap_or_default();
    tolerations.extend(daemon_tolerations().as_array().cloned().unwrap_or_default());
    spec["tolerations"] = json!(tolerations);
    Ok(serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}))?)
}

/// The node a daemon pod is for: where it runs, or where its affinity pins it.
fn target_node(pod: &Pod) -> Option<String> {
    if let Some(n) = pod.spec.as_ref().and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()) {
        return Some(n);
    }
    let terms = pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?;
    terms
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name")?
        .values
        .as_ref()?
        .first()
        .cloned()
}

/// The set's template as its revisions stand.
struct Revisions {
    /// The hash of the revision new pods get.
    hash: String,
    /// The hashes of every revision holding the set's template: pods with any of them
    /// are up to date.
    current: Vec<String>,
}

/// The hash a revision gives its pods: its label, or its name after `<set>-`.
fn revision_hash(ds: &DaemonSet, revision: &ControllerRevision) -> String {
    revision.labels().get(HASH_LABEL).cloned().unwrap_or_else(|| {
        let name = revision.name_any();
        name.strip_prefix(&format!("{}-", ds.name_any())).unwrap_or(&name).to_string()
    })
}

/// Finds the ControllerRevision holding the set's template (the latest, when several
/// do), moving its number past the others' (a rollback), or records a new one; prunes
/// unused revisions beyond `revisionHistoryLimit`. None: a revision of another template
/// took the name, so `status.collisionCount` was bumped and the set must sync again.
async fn revisions(ctx: &Context, ds: &DaemonSet, template: &Value, pods: &[Pod]) -> Result<Option<Revisions>, Error> {
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ds.namespace().unwrap_or_default());
    let all = history::owned(&api, &ds.uid().unwrap_or_default()).await?;
    let (matching, old): (Vec<ControllerRevision>, Vec<ControllerRevision>) =
        all.into_iter().partition(|r| history::template_of(r).as_ref() == Some(template));
    let next = old.iter().filter_map(|r| r.revision).max().unwrap_or(0) + 1;
    let latest = match matching.last() {
        Some(latest) if latest.revision.unwrap_or(0) < next => {
            let patch = Patch::Merge(json!({"revision": next}));
            api.patch(&latest.name_any(), &PatchParams::default(), &patch).await?
        }
        Some(latest) => latest.clone(),
        None => {
            let collisions = ds.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0);
            let hash = crate::template_hash(template, collisions.into());
            let name = format!("{}-{hash}", ds.name_any());
            let mut labels = json!(ds.spec.template.metadata.as_ref().and_then(|m| m.labels.clone()));
            labels[HASH_LABEL] = json!(hash);
            let owner = json!(ds.controller_owner_ref(&()).expect("a stored daemonset has a name and uid"));
            let mut revision = history::revision(&name, owner, labels, template, next)?;
            revision.metadata.annotations = ds.metadata.annotations.clone();
            match api.create(&PostParams::default(), &revision).await {
                Ok(created) => created,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let taken = api.get(&name).await?;
                    if history::template_of(&taken).as_ref() != Some(template) {
                        let status = json!({"status": {"collisionCount": collisions + 1}});
                        Api::<DaemonSet>::namespaced(ctx.client.clone(), &ds.namespace().unwrap_or_default())
                            .patch_status(&ds.name_any(), &PatchParams::default(), &Patch::Merge(status))
                            .await?;
                        return Ok(None);
                    }
                    taken
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let in_use: Vec<&String> = pods.iter().filter_map(|p| p.labels().get(HASH_LABEL)).collect();
    let limit = ds.spec.revision_history_limit.unwrap_or(10);
    history::prune(&api, &old, |r| in_use.contains(&&revision_hash(ds, r)), limit).await;
    let mut current: Vec<String> = matching.iter().map(|r| revision_hash(ds, r)).collect();
    let hash = revision_hash(ds, &latest);
    current.push(hash.clone());
    Ok(Some(Revisions { hash, current }))
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ds.namespace().unwrap_or_default();
    let spec = ds.spec.clone();
    let template = serde_json::to_value(&spec.template)?;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = ds.uid().unwrap_or_default();
    let selector = label_selector_string(&serde_json::to_value(&spec.selector)?);
    let Some(owned) = ctx.pods.of(&uid, Some(&selector)) else { return Ok(Action::requeue(CACHE_LAG_RETRY)) };
    let Some(Revisions { hash, current: current_hashes }) = revisions(&ctx, &ds, &template, &owned).await? else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let up_to_date = |p: &Pod| p.labels().get(HASH_LABEL).is_some_and(|h| current_hashes.contains(h));
    // A daemon pod that failed is deleted and made again below, as upstream's, after a
    // back-off per node that grows while pods keep failing there.
    let mut backing_off: Vec<String> = Vec::new();
    let mut requeue: Option<Duration> = None;
    for pod in owned.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Failed") {
            continue;
        }
        let node = target_node(pod).unwrap_or_default();
        let key = (uid.clone(), node.clone());
        let now = std::time::Instant::now();
        let wait = {
            let mut backoff = ctx.failed_backoff.lock().expect("backoff lock");
            match backoff.get(&key).copied() {
                Some((next, _)) if now < next => Some(next - now),
                previous => {
                    let delay = previous.map_or(Duration::from_secs(1), |(_, d)| (d * 2).min(FAILED_BACKOFF_MAX));
                    backoff.insert(key, (now + delay, delay));
                    None
                }
            }
        };
        if let Some(wait) = wait {
            backing_off.push(node);
            requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
            continue;
        }
        let message = format!("Found failed daemon pod {ns}/{} on node {node}, will try to kill it", pod.name_any());
        ctx.events.warning(&reference(&*ds), "FailedDaemonPod", &message).await;
        tolerate(pods_api.delete(&pod.name_any(), &DeleteParams::default()).await, &[404])?;
        ctx.pods.deleted(&uid, pod);
    }
    let pods: Vec<Pod> = owned
        .into_iter()
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Failed" | "Succeeded")))
        .collect();
    // Live pods by node; a node whose pod is still terminating gets no new one until it
    // is gone (upstream's), so a rollout never runs two pods on a node.
    let mut by_node: HashMap<String, Vec<&Pod>> = HashMap::new();
    let mut terminating: Vec<String> = Vec::new();
    for p in &pods {
        match (target_node(p), p.metadata.deletion_timestamp.is_some()) {
            (Some(n), false) => by_node.entry(n).or_default().push(p),
            (Some(n), true) => terminating.push(n),
            (None, _) => {}
        }
    }
    let probe = daemon_pod(&ds, "", &hash)?;
    let nodes = ctx.nodes.state();
    let eligible: Vec<String> = nodes
        .iter()
        .filter(|n| {
            let mut p = probe.clone();
            if let Some(s) = p.spec.as_mut() {
                s.affinity = spec.template.spec.as_ref().and_then(|t| t.affinity.clone());
            }
            krate_scheduler::plugins::node_selected(&p, n).is_none()
        })
        .map(|n| n.name_any())
        .collect();
    let mut misscheduled = 0;
    // Daemon pods on nodes that should not run one, and duplicates.
    let mut to_delete: Vec<&Pod> = Vec::new();
    for (node, list) in &by_node {
        if !eligible.contains(node) {
            misscheduled += list.len();
            to_delete.extend(list.iter().copied());
        } else {
            to_delete.extend(list.iter().skip(1).copied());
        }
    }
    let waiting = |n: &String| by_node.contains_key(n) || backing_off.contains(n) || terminating.contains(n);
    for node in eligible.iter().filter(|n| !waiting(n)) {
        let pod = pods_api.create(&PostParams::default(), &daemon_pod(&ds, node, &hash)?).await?;
        ctx.pods.created(&uid, &pod);
        ctx.events.normal(&reference(&*ds), "SuccessfulCreate", &format!("Created pod: {}", pod.name_any())).await;
    }
    // Rolling update: replace outdated pods, at most maxUnavailable unavailable at once.
    let max_unavailable = match spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone())
    {
        Some(IntOrString::Int(n)) => n.max(1) as usize,
        Some(IntOrString::String(p)) => {
            ((p.trim_end_matches('%').parse::<f64>().unwrap_or(0.0) * eligible.len() as f64 / 100.0).floor() as usize)
                .max(1)
        }
        None => 1,
    };
    let on_delete = spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("OnDelete");
    let current: Vec<&Pod> = eligible.iter().filter_map(|n| by_node.get(n).and_then(|l| l.first().copied())).collect();
    if !on_delete {
        // Upstream's rolling update: an outdated pod that is not available is replaced at
        // once; available ones only while fewer than maxUnavailable are unavailable (a
        // node without its pod, or with an up-to-date one not ready, counts).
        let missing = eligible.len() - current.len();
        let unready_updated = current.iter().filter(|p| up_to_date(p) && !is_ready(p)).count();
        let (outdated_ready, outdated_unready): (Vec<&Pod>, Vec<&Pod>) =
            current.iter().copied().filter(|p| !up_to_date(p)).partition(|p| is_ready(p));
        let budget = max_unavailable.saturating_sub(missing + unready_updated);
        to_delete.extend(outdated_unready);
        to_delete.extend(outdated_ready.into_iter().take(budget));
    }
    for pod in to_delete {
        tolerate(pods_api.delete(&pod.name_any(), &DeleteParams::default()).await, &[404])?;
        ctx.pods.deleted(&uid, pod);
    }
    let scheduled = current.iter().filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()).count();
    let ready = current.iter().filter(|p| is_ready(p)).count();
    let updated = current.iter().filter(|p| up_to_date(p)).count();
    let status = json!({
        "desiredNumberScheduled": eligible.len(), "currentNumberScheduled": scheduled, "numberReady": ready,
        "numberAvailable": ready, "numberUnavailable": eligible.len() - ready, "updatedNumberScheduled": updated,
        "numberMisscheduled": misscheduled, "observedGeneration": ds.metadata.generation,
    });
    let before = serde_json::to_value(ds.status.clone().unwrap_or_default())?;
    if status
        .as_object()
        .expect("status is an object")
        .iter()
        .any(|(k, v)| before.get(k).cloned().unwrap_or(json!(0)) != *v)
    {
        Api::<DaemonSet>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&ds.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": status})))
            .await?;
    }
    Ok(requeue.map(Action::requeue).unwrap_or_else(Action::await_change))
}

fn error_policy(ds: Arc<DaemonSet>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(daemonset = %ds.name_any(), error = %err, "daemonset sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: kube::Client, pods: &Informer<Pod>) -> anyhow::Result<()> {
    let pods = OwnedPods::new(pods);
    pods.synced().await;
    let (store, writer) = reflector::store();
    // Every node change re-examines every DaemonSet.
    let node_changes = watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .map(|_| ());
    Controller::new(Api::<DaemonSet>::all(client.clone()), watcher::Config::default())
        .owns_shared_stream(pods.changes())
        .reconcile_all_on(node_changes)
        .run(
            reconcile,
            error_policy,
            Arc::new(Context {
                events: Recorder::new(client.clone(), "daemonset-controller"),
                client,
                nodes: store,
                pods,
                failed_backoff: Default::default(),
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}
