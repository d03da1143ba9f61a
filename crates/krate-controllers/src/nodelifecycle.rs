//! Node lifecycle: a node whose Lease is not renewed within the grace period becomes
//! NotReady (conditions Unknown) and gets the `node.kubernetes.io/unreachable` taints;
//! pods on it that do not tolerate the NoExecute taint are evicted, at once or after
//! their `tolerationSeconds`. A renewed Lease lifts the taints again.
//!
//! Nodes not ready or under pressure get upstream's NoSchedule taints by condition
//! (`node.kubernetes.io/not-ready`, `memory-pressure`, `disk-pressure`, `pid-pressure`),
//! lifted when the condition clears, so the scheduler places new pods elsewhere.
//!
//! Timers, not polling: the loop sleeps until the next Lease expires or the next
//! eviction is due, and wakes for Lease and Node changes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;
use tokio::time::Instant;

use crate::Informer;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// When the lease stops counting as fresh.
fn expiry(lease: &Lease, grace: Duration) -> Option<Instant> {
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0;
    let age = jiff::Timestamp::now().duration_since(renewed);
    let age = Duration::from_secs_f64(age.as_secs_f64().max(0.0));
    Some(Instant::now() + grace.saturating_sub(age))
}

fn unreachable(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|ts| ts.iter().any(|t| t.key == UNREACHABLE))
}

/// Node conditions and the NoSchedule taint each puts on its node while it has the
/// status given. (Ready Unknown is the unreachable taint's, above.)
const CONDITION_TAINTS: [(&str, &str, &str); 4] = [
    ("Ready", "False", "node.kubernetes.io/not-ready"),
    ("MemoryPressure", "True", "node.kubernetes.io/memory-pressure"),
    ("DiskPressure", "True", "node.kubernetes.io/disk-pressure"),
    ("PIDPressure", "True", "node.kubernetes.io/pid-pressure"),
];

/// The node's taints with the condition taints matching its conditions, when they differ
/// from what it has.
fn condition_taints(node: &Node) -> Option<Vec<Taint>> {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    let current: Vec<Taint> = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let mut wanted = current.clone();
    for (condition, status, key) in CONDITION_TAINTS {
        let on = conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == condition && c.status == status));
        let has = current.iter().any(|t| t.key == key && t.effect == "NoSchedule");
        if on && !has {
            wanted.push(Taint { key: key.into(), effect: "NoSchedule".into(), time_added: None, value: None });
        } else if !on && has {
            wanted.retain(|t| !(t.key == key && t.effect == "NoSchedule"));
        }
    }
    (wanted != current).then_some(wanted)
}

/// Sets the condition taints; on a conflict (the node changed meanwhile) the next event
/// of the node tries again.
async fn taint_by_conditions(client: &kube::Client, node: &Node, taints: Vec<Taint>) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"metadata": {"resourceVersion": node.metadata.resource_version}, "spec": {"taints": taints}});
    crate::tolerate(nodes.patch(&node.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await, &[404, 409])?;
    Ok(())
}

fn tolerated_for(tolerations: &[Toleration], taint: &Taint) -> Option<Option<i64>> {
    tolerations.iter().find(|t| krate_api::selectors::toleration_matches(t, taint)).map(|t| t.toleration_seconds)
}

async fn mark_unreachable(client: &kube::Client, node: &Node, reachable: bool) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let name = node.name_any();
    let mut taints: Vec<Taint> = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    taints.retain(|t| t.key != UNREACHABLE);
    if !reachable {
        for effect in ["NoSchedule", "NoExecute"] {
            taints.push(Taint {
                key: UNREACHABLE.into(),
                effect: effect.into(),
                time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())),
                value: None,
            });
        }
    }
    nodes.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"taints": taints}}))).await?;
    let conditions: Vec<serde_json::Value> = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            if reachable && c.type_ == "Ready" {
                v["status"] = json!("True");
                v["reason"] = json!("KubeletReady");
                v["message"] = json!("the node's lease is being renewed again");
                v["lastTransitionTime"] = json!(krate_client::now());
            } else if !reachable {
                v["status"] = json!("Unknown");
                v["reason"] = json!("NodeStatusUnknown");
                v["message"] = json!("Kubelet stopped posting node status.");
                v["lastTransitionTime"] = json!(krate_client::now());
            }
            v
        })
        .collect();
    nodes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": {"conditions": conditions}})))
        .await?;
    tracing::info!(node = %name, reachable, "node reachability changed");
    Ok(())
}

/// Schedules the eviction of pods on a NoExecute-tainted node.
fn plan_evictions(
    pods: &Informer<Pod>,
    node: &Node,
    due: &mut BTreeMap<(Instant, String), (String, String)>,
) -> anyhow::Result<()> {
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.effect == "NoExecute")
        .collect();
    if taints.is_empty() {
        return Ok(());
    }
    let name = node.name_any();
    let on_node =
        pods.store().state().into_iter().filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()) == Some(&name));
    for pod in on_node.filter(|p| p.metadata.deletion_timestamp.is_none()) {
        let tolerations = pod.spec.as_ref().and_then(|s| s.tolerations.clone()).unwrap_or_default();
        // The shortest toleration among the taints decides; an untolerated taint evicts now.
        let mut wait: Option<Duration> = None;
        for taint in &taints {
            let after = match tolerated_for(&tolerations, taint) {
                None => Some(Duration::ZERO),
                Some(Some(seconds)) => Some(Duration::from_secs(seconds.max(0) as u64)),
                Some(None) => None,
            };
            if let Some(a) = after {
                wait = Some(wait.map_or(a, |w| w.min(a)));
            }
        }
        if let Some(w) = wait {
            let key = (Instant::now() + w, pod.uid().unwrap_or_default());
            due.insert(key, (pod.namespace().unwrap_or_default(), pod.name_any()));
        }
    }
    Ok(())
}

pub async fn run(client: kube::Client, grace: Duration, pods: &Informer<Pod>) -> anyhow::Result<()> {
    pods.synced().await;
    let mut leases =
        watcher::watcher(Api::<Lease>::namespaced(client.clone(), "kube-node-lease"), watcher::Config::default())
            .default_backoff()
            .boxed();
    let mut node_events =
        watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).default_backoff().boxed();
    let mut nodes: HashMap<String, Node> = HashMap::new();
    let mut expiries: HashMap<String, Instant> = HashMap::new();
    let mut evictions: BTreeMap<(Instant, String), (String, String)> = BTreeMap::new();
    let far = Duration::from_secs(3600);
    loop {
        let next_expiry = expiries
            .iter()
            .filter(|(n, _)| nodes.get(*n).is_some_and(|node| !unreachable(node)))
            .map(|(_, t)| *t)
            .min();
        let next_eviction = evictions.keys().next().map(|(t, _)| *t);
        let wake = [next_expiry, next_eviction].into_iter().flatten().min().unwrap_or_else(|| Instant::now() + far);
        tokio::select! {
            ev = leases.next() => match ev {
                Some(Ok(Event::Apply(lease) | Event::InitApply(lease))) => {
                    let name = lease.name_any();
                    if let Some(t) = expiry(&lease, grace) {
                        expiries.insert(name.clone(), t);
                        if let Some(node) = nodes.get(&name).filter(|n| unreachable(n) && t > Instant::now()) {
                            mark_unreachable(&client, node, true).await?;
                        }
                    }
                }
                Some(Ok(Event::Delete(lease))) => { expiries.remove(&lease.name_any()); }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "lease watch error"),
                None => return Ok(()),
            },
            ev = node_events.next() => match ev {
                Some(Ok(Event::Apply(node) | Event::InitApply(node))) => {
                    let newly_tainted = unreachable(&node) && !nodes.get(&node.name_any()).is_some_and(unreachable);
                    if newly_tainted {
                        plan_evictions(pods, &node, &mut evictions)?;
                    }
                    if let Some(taints) = condition_taints(&node) {
                        taint_by_conditions(&client, &node, taints).await?;
                    }
                    nodes.insert(node.name_any(), node);
                }
                Some(Ok(Event::Delete(node))) => { nodes.remove(&node.name_any()); }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "node watch error"),
                None => return Ok(()),
            },
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let expired: Vec<Node> = expiries
                    .iter()
                    .filter(|(_, t)| **t <= now)
                    .filter_map(|(n, _)| nodes.get(n))
                    .filter(|n| !unreachable(n))
                    .cloned()
                    .collect();
                for node in expired {
                    mark_unreachable(&client, &node, false).await?;
                }
                while let Some(entry) = evictions.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let (ns, name) = entry.remove();
                    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => tracing::info!(pod = %name, namespace = %ns, "evicted from an unreachable node"),
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => tracing::warn!(pod = %name, error = %e, "eviction failed"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(conditions: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": "n"}, "spec": {"taints": taints}, "status": {"conditions": conditions}}),
        )
        .unwrap()
    }

    #[test]
    fn pressure_conditions_put_and_lift_their_taints() {
        let keys = |t: Option<Vec<Taint>>| {
            t.map(|ts| ts.into_iter().map(|t| format!("{}:{}", t.key, t.effect)).collect::<Vec<_>>())
        };
        let other = json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]);
        let pressured =
            json!([{"type": "DiskPressure", "status": "True"}, {"type": "MemoryPressure", "status": "False"}]);
        assert_eq!(
            keys(condition_taints(&node(pressured.clone(), other.clone()))),
            Some(vec!["dedicated:NoSchedule".to_string(), "node.kubernetes.io/disk-pressure:NoSchedule".into()])
        );
        let tainted = json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}, {"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"}]);
        assert_eq!(keys(condition_taints(&node(pressured, tainted.clone()))), None, "nothing to change");
        let shutting_down = json!([{"type": "Ready", "status": "False"}]);
        assert_eq!(
            keys(condition_taints(&node(shutting_down, json!([])))),
            Some(vec!["node.kubernetes.io/not-ready:NoSchedule".to_string()])
        );
        let relieved = json!([{"type": "DiskPressure", "status": "False"}]);
        assert_eq!(keys(condition_taints(&node(relieved, tainted))), Some(vec!["dedicated:NoSchedule".to_string()]));
        assert_eq!(keys(condition_taints(&node(json!([]), other))), None);
    }
}
