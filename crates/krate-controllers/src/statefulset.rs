//! StatefulSets: pods with stable names (`web-0`, `web-1`, ...) and hostnames, created
//! in order (OrderedReady: each waits for the previous to be Running and Ready) or all at
//! once (Parallel), removed from the highest ordinal down, with a PersistentVolumeClaim
//! per volumeClaimTemplate and pod, and rolling updates from the highest ordinal down to
//! the partition.
//!
//! Each template the set has had is kept as a ControllerRevision (`<set>-<hash>`, its
//! template in `data`, numbered in order; `revisionHistoryLimit` of the unused ones
//! kept), as upstream's: `status.currentRevision` stays the revision the pods had until
//! every pod runs the update revision and is ready, and a pod recreated below the
//! partition comes from the current revision's template, so a canary or phased rollout
//! holds when pods are deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::history;
use crate::owned::{OwnedPods, CACHE_LAG_RETRY};
use crate::replicas::is_ready;
use crate::selector::label_selector_string;
use crate::{reference, tolerate, Error, Informer, Recorder};

const REVISION_LABEL: &str = "controller-revision-hash";

struct Context {
    client: kube::Client,
    events: Recorder,
    pods: OwnedPods,
}

fn revision(sts: &StatefulSet) -> Result<String, Error> {
    Ok(format!("{}-{}", sts.name_any(), crate::template_hash(&serde_json::to_value(&sts.spec.template)?, 0)))
}

fn ordinal(sts: &StatefulSet, pod: &Pod) -> Option<i32> {
    pod.name_any().strip_prefix(&format!("{}-", sts.name_any()))?.parse().ok()
}

fn claim_name(template: &Value, sts: &str, i: i32) -> String {
    format!("{}-{sts}-{i}", template.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default())
}

/// The pod of ordinal `i` from `template` (of revision `revision`).
fn pod_for(sts: &StatefulSet, template: &Value, i: i32, revision: &str) -> Result<Pod, Error> {
    let name = format!("{}-{i}", sts.name_any());
    let mut metadata = template.get("metadata").cloned().unwrap_or_else(|| json!({}));
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(sts.namespace());
    metadata["labels"][REVISION_LABEL] = json!(revision);
    metadata["labels"]["statefulset.kubernetes.io/pod-name"] = json!(name);
    metadata["labels"]["apps.kubernetes.io/pod-index"] = json!(i.to_string());
    metadata["ownerReferences"] =
        json!([sts.controller_owner_ref(&()).expect("a stored statefulset has a name and uid")]);
    let mut spec = template.get("spec").cloned().unwrap_or_default();
    spec["hostname"] = json!(name);
    if let Some(service) = &sts.spec.service_name {
        spec["subdomain"] = json!(service);
    }
    let mut volumes = spec.get("volumes").and_then(Value::as_array).cloned().unwrap_or_default();
    for claim in sts.spec.volume_claim_templates.iter().flatten() {
        let claim = serde_json::to_value(claim)?;
        let volume = claim.pointer("/metadata/name").cloned().unwrap_or_default();
        volumes.retain(|v| v["name"] != volume);
        volumes.push(
            json!({"name": volume, "persistentVolumeClaim": {"claimName": claim_name(&claim, &sts.name_any(), i)}}),
        );
    }
    if !volumes.is_empty() {
        spec["volumes"] = json!(volumes);
    }
    Ok(serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}))?)
}

/// Makes sure the set's template is kept as ControllerRevision `name` (the next number)
/// and that no more than `revisionHistoryLimit` revisions nobody uses remain.
async fn record_revision(client: &kube::Client, sts: &StatefulSet, name: &str, in_use: &[&str]) -> Result<(), Error> {
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &sts.namespace().unwrap_or_default());
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let existing = history::owned(&api, &sts.uid().unwrap_or_default()).await?;
    let number = existing.last().and_then(|r| r.revision).unwrap_or(0) + 1;
    let labels = json!(sts.spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default());
    let owner = json!(sts.controller_owner_ref(&()).expect("a stored statefulset has a name and uid"));
    let template = serde_json::to_value(&sts.spec.template)?;
    let revision = history::revision(name, owner, labels, &template, number)?;
    tolerate(api.create(&PostParams::default(), &revision).await, &[409])?;
    let limit = sts.spec.revision_history_limit.unwrap_or(10);
    history::prune(&api, &existing, |r| in_use.contains(&r.name_any().as_str()), limit).await;
    Ok(())
}

/// The pod template a ControllerRevision of the set keeps (None: not found).
async fn revision_template(client: &kube::Client, sts: &StatefulSet, name: &str) -> Result<Option<Value>, Error> {
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &sts.namespace().unwrap_or_default());
    Ok(api.get_opt(name).await?.as_ref().and_then(history::template_of))
}

async fn ensure_claims(client: &kube::Client, sts: &StatefulSet, i: i32) -> Result<(), Error> {
    let ns = sts.namespace().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    for claim in sts.spec.volume_claim_templates.iter().flatten() {
        let mut c = serde_json::to_value(claim)?;
        let name = claim_name(&c, &sts.name_any(), i);
        c["metadata"] = json!({"name": name, "namespace": ns, "labels": sts.spec.selector.match_labels});
        c["apiVersion"] = json!("v1");
        c["kind"] = json!("PersistentVolumeClaim");
        if let Some(obj) = c.as_object_mut() {
            obj.remove("status");
        }
        tolerate(api.create(&PostParams::default(), &serde_json::from_value(c)?).await, &[409])?;
    }
    Ok(())
}

fn running_and_ready(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && is_ready(pod)
}

async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    if sts.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = sts.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = sts.uid().unwrap_or_default();
    let selector = label_selector_string(&serde_json::to_value(&sts.spec.selector)?);
    let Some(owned) = ctx.pods.of(&uid, Some(&selector)) else { return Ok(Action::requeue(CACHE_LAG_RETRY)) };
    let pods: BTreeMap<i32, Pod> = owned.into_iter().filter_map(|p| ordinal(&sts, &p).map(|i| (i, p))).collect();
    let wanted = sts.spec.replicas.unwrap_or(1);
    let parallel = sts.spec.pod_management_policy.as_deref() == Some("Parallel");
    let update_revision = revision(&sts)?;
    let live = |p: &Pod| p.metadata.deletion_timestamp.is_none();
    let current_revision = sts
        .status
        .as_ref()
        .and_then(|s| s.current_revision.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| update_revision.clone());
    let mut in_use: Vec<&str> =
        pods.values().filter_map(|p| p.labels().get(REVISION_LABEL).map(String::as_str)).collect();
    in_use.push(&current_revision);
    record_revision(&ctx.client, &sts, &update_revision, &in_use).await?;
    let on_delete = sts.spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("OnDelete");
    let rolling = sts.spec.update_strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
    let partition = rolling.and_then(|r| r.partition).unwrap_or(0);
    // Below the partition (or, with no rollingUpdate at all, below the pods already at
    // the current revision), a pod is recreated as it was: from the current revision.
    let held_below = match rolling {
        Some(_) => partition,
        None => pods.values().filter(|p| p.labels().get(REVISION_LABEL) == Some(&current_revision)).count() as i32,
    };
    let template = serde_json::to_value(&sts.spec.template)?;

    // A pod that failed or finished (a node refused it, say) is deleted to be made again,
    // as upstream's.
    for pod in pods.values().filter(|p| live(p)) {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Failed" | "Succeeded")) {
            let _ = api.delete(&pod.name_any(), &DeleteParams::default()).await;
            ctx.pods.deleted(&uid, pod);
            let message = format!("delete Pod {} in StatefulSet {} successful", pod.name_any(), sts.name_any());
            ctx.events.normal(&reference(&*sts), "SuccessfulDelete", &message).await;
        }
    }
    // Create missing pods in order; OrderedReady waits for each predecessor.
    for i in 0..wanted {
        match pods.get(&i) {
            Some(p) if live(p) => {
                if !parallel && !running_and_ready(p) {
                    break;
                }
            }
            Some(_) => break, // still terminating: its name is not free yet
            None => {
                ensure_claims(&ctx.client, &sts, i).await?;
                let old = if !on_delete && i < held_below && current_revision != update_revision {
                    revision_template(&ctx.client, &sts, &current_revision).await?
                } else {
                    None
                };
                let pod = match &old {
                    Some(old) => pod_for(&sts, old, i, &current_revision)?,
                    None => pod_for(&sts, &template, i, &update_revision)?,
                };
                match api.create(&PostParams::default(), &pod).await {
                    Ok(pod) => {
                        ctx.pods.created(&uid, &pod);
                        let message =
                            format!("create Pod {} in StatefulSet {} successful", pod.name_any(), sts.name_any());
                        ctx.events.normal(&reference(&*sts), "SuccessfulCreate", &message).await;
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
                if !parallel {
                    break;
                }
            }
        }
    }
    // Scale down from the highest ordinal. OrderedReady halts while any pod is unhealthy
    // and removes one pod at a time, the next once the last is gone (upstream's monotonic
    // scaling).
    let extra: Vec<&Pod> = pods.range(wanted..).rev().map(|(_, p)| p).filter(|p| live(p)).collect();
    let halted = !parallel
        && (pods.values().any(|p| live(p) && !running_and_ready(p)) || pods.range(wanted..).any(|(_, p)| !live(p)));
    let deletions = if parallel {
        extra.len()
    } else if halted {
        0
    } else {
        1
    };
    for p in extra.iter().take(deletions) {
        let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
        ctx.pods.deleted(&uid, p);
    }
    // Rolling update: highest outdated ordinal at or above the partition, once all are ready.
    let all_ready = (0..wanted).all(|i| pods.get(&i).is_some_and(|p| live(p) && running_and_ready(p)));
    if !on_delete && all_ready && extra.is_empty() {
        let outdated = (partition..wanted)
            .rev()
            .find_map(|i| pods.get(&i).filter(|p| p.labels().get(REVISION_LABEL) != Some(&update_revision)));
        if let Some(p) = outdated {
            let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
            ctx.pods.deleted(&uid, p);
        }
    }

    let current: Vec<&Pod> = pods.values().filter(|p| live(p)).collect();
    let ready = current.iter().filter(|p| is_ready(p)).count();
    let updated = current.iter().filter(|p| p.labels().get(REVISION_LABEL) == Some(&update_revision)).count();
    // The update is complete once every pod runs it and is ready (upstream's rule).
    let complete = !on_delete && updated == current.len() && ready == current.len();
    let current_revision = if complete { update_revision.clone() } else { current_revision };
    let at_current = current.iter().filter(|p| p.labels().get(REVISION_LABEL) == Some(&current_revision)).count();
    let status = json!({
        "replicas": current.len(), "readyReplicas": ready, "availableReplicas": ready, "currentReplicas": at_current,
        "updatedReplicas": updated, "updateRevision": update_revision, "currentRevision": current_revision,
        "observedGeneration": sts.metadata.generation,
    });
    let before = serde_json::to_value(sts.status.clone().unwrap_or_default())?;
    if status
        .as_object()
        .expect("status is an object")
        .iter()
        .any(|(k, v)| before.get(k).cloned().unwrap_or(json!(0)) != *v)
    {
        Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&sts.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": status})))
            .await?;
    }
    Ok(Action::await_change())
}

fn error_policy(sts: Arc<StatefulSet>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(statefulset = %sts.name_any(), error = %err, "statefulset sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: kube::Client, pods: &Informer<Pod>) -> anyhow::Result<()> {
    let pods = OwnedPods::new(pods);
    pods.synced().await;
    Controller::new(Api::<StatefulSet>::all(client.clone()), watcher::Config::default())
        .owns_shared_stream(pods.changes())
        .run(
            reconcile,
            error_policy,
            Arc::new(Context { events: Recorder::new(client.clone(), "statefulset-controller"), client, pods }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}
