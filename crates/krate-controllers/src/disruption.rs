//! PodDisruptionBudget status: how many of the pods a budget covers are healthy, how
//! many must stay healthy, and so how many voluntary disruptions (evictions through
//! `pods/eviction`) are allowed now. Pods evicted but not yet gone stay counted as
//! disrupted (status.disruptedPods) so that two evictions cannot overspend.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use krate_client::selectors::selector_matches;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::replicas::is_ready;
use crate::{int_or_percent, resource, Error, Informer};

/// How long an eviction's mark on a pod counts before the pod is judged by itself again.
const DISRUPTION_TIMEOUT: Duration = Duration::from_secs(120);

struct Context {
    client: kube::Client,
    pods: Informer<Pod>,
}

/// `value` of a count-or-percentage field against `total` (percentages round up).
fn scaled(value: &IntOrString, total: i64) -> i64 {
    i64::from(int_or_percent(value, i32::try_from(total).unwrap_or(i32::MAX), true))
}

/// The owner kinds whose `spec.replicas` says how many pods a budget should expect.
fn scalable(kind: &str) -> Option<ApiResource> {
    match kind {
        "ReplicaSet" => Some(resource("apps", "v1", "ReplicaSet", "replicasets")),
        "StatefulSet" => Some(resource("apps", "v1", "StatefulSet", "statefulsets")),
        "ReplicationController" => Some(resource("", "v1", "ReplicationController", "replicationcontrollers")),
        _ => None,
    }
}

/// Pods the budget expects: the replicas of the controllers of its pods (each pod
/// without one counts for itself).
async fn expected_pods(client: &kube::Client, ns: &str, pods: &[Pod]) -> Result<i64, Error> {
    let mut seen = HashSet::new();
    let mut expected = 0;
    for pod in pods {
        let owner = pod.owner_references().iter().find(|r| r.controller == Some(true));
        match owner.and_then(|o| scalable(&o.kind).map(|r| (o, r))) {
            Some((owner, res)) => {
                if seen.insert(owner.uid.clone()) {
                    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &res);
                    let replicas = api
                        .get_opt(&owner.name)
                        .await?
                        .and_then(|o| o.data.pointer("/spec/replicas").and_then(Value::as_i64));
                    expected += replicas.unwrap_or(1);
                }
            }
            None => expected += 1,
        }
    }
    Ok(expected)
}

async fn reconcile(pdb: Arc<PodDisruptionBudget>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pdb.namespace().unwrap_or_default();
    let spec = pdb.spec.clone().unwrap_or_default();
    let pods: Vec<Pod> = match &spec.selector {
        None => vec![],
        Some(sel) => ctx
            .pods
            .in_namespace(&ns)
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && selector_matches(sel, p.labels()))
            .map(Arc::unwrap_or_clone)
            .collect(),
    };
    let now = jiff::Timestamp::now();
    let old_status = pdb.status.clone().unwrap_or_default();
    // Evicted pods still present (and not yet timed out) count as disrupted.
    let present: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
    let disrupted: BTreeMap<String, Value> = old_status
        .disrupted_pods
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, at)| {
            present.contains(name) && now.duration_since(at.0).as_secs() < DISRUPTION_TIMEOUT.as_secs() as i64
        })
        .map(|(name, at)| (name, json!(at.0.to_string())))
        .collect();
    let healthy = pods.iter().filter(|p| is_ready(p) && !disrupted.contains_key(&p.name_any())).count() as i64;
    let expected = expected_pods(&ctx.client, &ns, &pods).await?;
    let desired = match (&spec.min_available, &spec.max_unavailable) {
        (_, Some(max)) => (expected - scaled(max, expected)).max(0),
        (Some(min), None) => scaled(min, expected),
        (None, None) => 1,
    };
    let allowed = (healthy - desired).max(0);
    let generation = pdb.metadata.generation.unwrap_or(0);
    let (cond_status, reason, message) =
        if allowed > 0 { ("True", "SufficientPods", "") } else { ("False", "InsufficientPods", "") };
    let old_condition =
        old_status.conditions.as_ref().and_then(|cs| cs.iter().find(|c| c.type_ == "DisruptionAllowed"));
    let transition = match old_condition {
        Some(c) if c.status == cond_status => json!(c.last_transition_time.0.to_string()),
        _ => json!(now.round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()),
    };
    let status = json!({
        "observedGeneration": generation,
        "disruptedPods": disrupted,
        "disruptionsAllowed": allowed,
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "conditions": [{"type": "DisruptionAllowed", "status": cond_status, "reason": reason, "message": message,
                        "observedGeneration": generation, "lastTransitionTime": transition}],
    });
    if serde_json::to_value(&old_status)? != status {
        let mut updated = (*pdb).clone();
        updated.status = Some(serde_json::from_value(status)?);
        let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
        // Carries the resourceVersion read: an eviction that spent the budget meanwhile
        // makes this fail and run again on the new status.
        api.replace_status(&pdb.name_any(), &PostParams::default(), &updated).await?;
    }
    // Evictions' marks expire without any other event.
    Ok(if disrupted.is_empty() { Action::await_change() } else { Action::requeue(DISRUPTION_TIMEOUT) })
}

fn error_policy(pdb: Arc<PodDisruptionBudget>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::debug!(pdb = %pdb.name_any(), error = %err, "disruption budget sync failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

pub async fn run(client: kube::Client, pods: &Informer<Pod>) -> anyhow::Result<()> {
    pods.synced().await;
    let controller = Controller::new(Api::<PodDisruptionBudget>::all(client.clone()), watcher::Config::default());
    let budgets = controller.store();
    // A pod change wakes the budgets of its namespace that cover it.
    let covering = move |pod: Arc<Pod>| {
        budgets
            .state()
            .into_iter()
            .filter(|b| b.namespace() == pod.namespace())
            .filter(|b| {
                b.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|sel| selector_matches(sel, pod.labels()))
            })
            .map(|b| ObjectRef::from_obj(&*b))
            .collect::<Vec<_>>()
    };
    controller
        .watches_shared_stream(pods.subscribe(), covering)
        .run(reconcile, error_policy, Arc::new(Context { client, pods: pods.clone() }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}
