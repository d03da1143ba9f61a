//! ReplicaSet and ReplicationController (the seeds' replication controller): keep
//! `spec.replicas` pods matching the selector alive, created from the template and owned
//! by the controller object, and report counts in status. One implementation for both;
//! they differ only in how the selector is written.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::owned::{OwnedPods, CACHE_LAG_RETRY};
use crate::selector::{label_selector_string, map_selector_string};
use crate::{tolerate, Error, Informer, Recorder};

struct Context {
    client: kube::Client,
    resource: ApiResource,
    events: Recorder,
    pods: OwnedPods,
}

fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

pub(crate) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The selector as a label-selector query, and whether the object has one.
fn selector(obj: &DynamicObject) -> Option<String> {
    let sel = obj.data.pointer("/spec/selector")?;
    if sel.get("matchLabels").is_some() || sel.get("matchExpressions").is_some() {
        Some(label_selector_string(sel))
    } else {
        Some(map_selector_string(sel))
    }
}

/// Which pod to delete first when scaling down: unassigned, then pending, then not
/// ready, then the newest.
fn deletion_rank(pod: &Pod) -> (bool, bool, bool, std::cmp::Reverse<Option<String>>) {
    let assigned = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some_and(|n| !n.is_empty());
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
    (assigned, running, is_ready(pod), std::cmp::Reverse(created))
}

fn pod_from_template(owner: &DynamicObject, resource: &ApiResource) -> Result<Pod, Error> {
    let template = owner.data.pointer("/spec/template").cloned().unwrap_or_default();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": format!("{}-", owner.name_any()),
            "namespace": owner.namespace(),
            "labels": template.pointer("/metadata/labels"),
            "annotations": template.pointer("/metadata/annotations"),
            "ownerReferences": [crate::owned::controller_reference(owner, resource)],
        },
        "spec": template.get("spec"),
    });
    Ok(serde_json::from_value(pod)?)
}

async fn reconcile(owner: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    if owner.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = owner.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(selector) = selector(&owner) else { return Ok(Action::await_change()) };
    let uid = owner.uid().unwrap_or_default();
    let Some(controlled) = ctx.pods.of(&uid, None) else { return Ok(Action::requeue(CACHE_LAG_RETRY)) };
    let reference = crate::owned::controller_reference(&*owner, &ctx.resource);
    let owned = ctx.pods.claim(&pods, &uid, &reference, &ns, &selector, controlled).await?;
    let mut active: Vec<Pod> = owned.iter().filter(|p| is_active(p)).cloned().collect();
    let wanted = owner.data.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0) as usize;
    // A create the API refuses (a quota, admission) shows as the ReplicaFailure
    // condition until the replicas are all there again, as upstream's.
    let mut failed_create: Option<String> = None;
    if active.len() < wanted {
        let pod = pod_from_template(&owner, &ctx.resource)?;
        for _ in active.len()..wanted {
            let created = match pods.create(&PostParams::default(), &pod).await {
                Ok(created) => created,
                Err(kube::Error::Api(e)) => {
                    let message = format!("Error creating: {}", e.message);
                    ctx.events.warning(&owner.object_ref(&ctx.resource), "FailedCreate", &message).await;
                    failed_create = Some(e.message);
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            ctx.pods.created(&uid, &created);
            ctx.events
                .normal(
                    &owner.object_ref(&ctx.resource),
                    "SuccessfulCreate",
                    &format!("Created pod: {}", created.name_any()),
                )
                .await;
            active.push(created);
        }
    } else if active.len() > wanted {
        active.sort_by_key(deletion_rank);
        let excess: Vec<Pod> = active.drain(..active.len() - wanted).collect();
        for pod in excess {
            tolerate(pods.delete(&pod.name_any(), &DeleteParams::default()).await, &[404])?;
            ctx.pods.deleted(&uid, &pod);
            ctx.events
                .normal(
                    &owner.object_ref(&ctx.resource),
                    "SuccessfulDelete",
                    &format!("Deleted pod: {}", pod.name_any()),
                )
                .await;
        }
    }
    let template_labels =
        owner.data.pointer("/spec/template/metadata/labels").and_then(Value::as_object).cloned().unwrap_or_default();
    let fully_labeled = active
        .iter()
        .filter(|p| template_labels.iter().all(|(k, v)| p.labels().get(k).map(String::as_str) == v.as_str()))
        .count();
    let ready = active.iter().filter(|p| is_ready(p)).count();
    let current = owner.data.get("status").cloned().unwrap_or_default();
    let mut conditions: Vec<Value> = current
        .get("conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c["type"] != "ReplicaFailure")
        .cloned()
        .collect();
    if let Some(message) = &failed_create {
        let kept = current
            .get("conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "ReplicaFailure" && c["message"] == json!(message));
        conditions.push(kept.cloned().unwrap_or_else(|| {
            json!({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message,
                   "lastTransitionTime": krate_client::now()})
        }));
    }
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully_labeled,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "observedGeneration": owner.metadata.generation,
        // Merge patch: null removes the last condition.
        "conditions": if conditions.is_empty() { Value::Null } else { json!(conditions) },
    });
    let changed = ["replicas", "fullyLabeledReplicas", "readyReplicas", "availableReplicas", "observedGeneration"]
        .iter()
        .any(|k| current.get(*k).cloned().unwrap_or(json!(0)) != status[*k])
        || current.get("conditions").cloned().unwrap_or(Value::Null) != status["conditions"];
    if changed {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ctx.resource);
        api.patch_status(&owner.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await?;
    }
    // A refused create is tried again (the quota may have room by then).
    Ok(if failed_create.is_some() { Action::requeue(Duration::from_secs(5)) } else { Action::await_change() })
}

fn error_policy(owner: Arc<DynamicObject>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %owner.name_any(), error = %err, "replica sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Upstream's component names, as events show them.
fn controller_name(resource: &ApiResource) -> &'static str {
    if resource.kind == "ReplicaSet" {
        "replicaset-controller"
    } else {
        "replication-controller"
    }
}

/// Runs the controller for one kind (ReplicaSet or ReplicationController).
pub async fn run(client: kube::Client, pods: &Informer<Pod>, resource: ApiResource) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let context = Context {
        events: Recorder::new(client.clone(), controller_name(&resource)),
        client,
        resource: resource.clone(),
        pods: OwnedPods::new(pods),
    };
    context.pods.synced().await;
    Controller::new_with(api, watcher::Config::default(), resource)
        .owns_shared_stream(context.pods.changes())
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}
