//! Deployments: one ReplicaSet per distinct pod template (named by the template's hash),
//! rolled from old to new with RollingUpdate (maxSurge/maxUnavailable) or Recreate, with
//! revisions in annotations so `kubectl rollout status|history|undo|restart|pause`
//! work as upstream.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::owned::{beside, Owned, CACHE_LAG_RETRY};
use crate::selector::label_selector_string;
use crate::template_hash;
use crate::{int_or_percent, reference, Error, Informer, Recorder};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX: &str = "deployment.kubernetes.io/max-replicas";
const HASH_LABEL: &str = "pod-template-hash";

struct Context {
    client: kube::Client,
    events: Recorder,
    replica_sets: Owned<ReplicaSet>,
}

/// A ReplicaSet's template without the hash label, for comparing with the Deployment's.
fn comparable_template(rs: &ReplicaSet) -> Value {
    let mut t = serde_json::to_value(&rs.spec.template).unwrap_or_default();
    if let Some(labels) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        labels.remove(HASH_LABEL);
    }
    t
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations().get(REVISION).and_then(|r| r.parse().ok()).unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    let s = rs.status.clone().unwrap_or_default();
    (s.replicas, s.ready_replicas.unwrap_or(0), s.available_replicas.unwrap_or(0))
}

/// An int-or-percent of `total`, rounded up (surge) or down (unavailable).
fn scaled(value: Option<&IntOrString>, total: i32, default: &str, round_up: bool) -> i32 {
    match value {
        Some(v) => int_or_percent(v, total, round_up),
        None => int_or_percent(&IntOrString::String(default.into()), total, round_up),
    }
}

fn new_replica_set(
    d: &Deployment,
    template: &Value,
    hash: &str,
    replicas: i32,
    revision: i64,
) -> Result<ReplicaSet, Error> {
    let mut template = template.clone();
    template["metadata"]["labels"][HASH_LABEL] = json!(hash);
    let mut selector = serde_json::to_value(&d.spec.selector).unwrap_or_default();
    selector["matchLabels"][HASH_LABEL] = json!(hash);
    let wanted = d.spec.replicas.unwrap_or(1);
    let mut annotations = d.annotations().clone();
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    annotations.insert(REVISION.into(), revision.to_string());
    annotations.insert(DESIRED.into(), wanted.to_string());
    let owner = d.controller_owner_ref(&()).expect("a stored deployment has a name and uid");
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": format!("{}-{hash}", d.name_any()), "namespace": d.namespace(), "labels": template["metadata"]["labels"],
                     "annotations": annotations, "ownerReferences": [owner]},
        "spec": {"replicas": replicas, "minReadySeconds": d.spec.min_ready_seconds, "selector": selector, "template": template},
    }))?)
}

async fn scale(
    ctx: &Context,
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    replicas: i32,
    d: &Deployment,
    max: i32,
) -> Result<(), Error> {
    let wanted = d.spec.replicas.unwrap_or(1);
    let patch = json!({"metadata": {"annotations": {DESIRED: wanted.to_string(), MAX: max.to_string()}}, "spec": {"replicas": replicas}});
    let after = api.patch(&rs.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
    ctx.replica_sets.updated(&d.uid().unwrap_or_default(), rs, &after);
    scaled_event(ctx, d, &rs.name_any(), spec_replicas(rs), replicas).await;
    Ok(())
}

/// Upstream's ScalingReplicaSet event.
async fn scaled_event(ctx: &Context, d: &Deployment, rs: &str, from: i32, to: i32) {
    if from != to {
        let direction = if to > from { "up" } else { "down" };
        ctx.events
            .normal(
                &reference(d),
                "ScalingReplicaSet",
                &format!("Scaled {direction} replica set {rs} from {from} to {to}"),
            )
            .await;
    }
}

/// Upstream's proportional scaling: a Deployment resized while several ReplicaSets are
/// active gets the difference (to `wanted + surge` in all) spread over them in
/// proportion to their sizes under the size they were last scaled for (their
/// max-replicas annotation), the largest first (the newest among equals when growing,
/// the oldest when shrinking), leftovers to the largest. The new sizes, by name.
fn proportional_sizes(active: &[&ReplicaSet], wanted: i32, surge: i32, status_replicas: i32) -> Vec<(String, i32)> {
    let allowed = if wanted > 0 { wanted + surge } else { 0 };
    let total: i32 = active.iter().map(|rs| spec_replicas(rs)).sum();
    let to_add = allowed - total;
    let created = |rs: &ReplicaSet| rs.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
    let mut sorted: Vec<&ReplicaSet> = active.to_vec();
    sorted.sort_by(|a, b| {
        let by_size = spec_replicas(b).cmp(&spec_replicas(a));
        let by_age = if to_add >= 0 { created(b).cmp(&created(a)) } else { created(a).cmp(&created(b)) };
        by_size.then(by_age)
    });
    let mut added = 0;
    let mut sizes: Vec<(String, i32)> = sorted
        .iter()
        .map(|rs| {
            let current = spec_replicas(rs);
            if to_add == 0 || current == 0 || added == to_add {
                return (rs.name_any(), current);
            }
            let fraction = if wanted == 0 {
                -current
            } else {
                let before = rs.annotations().get(MAX).and_then(|m| m.parse::<i32>().ok()).filter(|m| *m > 0);
                let before = before.unwrap_or(status_replicas).max(1);
                (current as f64 * allowed as f64 / before as f64).round() as i32 - current
            };
            let left = to_add - added;
            let proportion = if to_add > 0 { fraction.min(left) } else { fraction.max(left) };
            added += proportion;
            (rs.name_any(), current + proportion)
        })
        .collect();
    if let Some(first) = sizes.first_mut() {
        first.1 = (first.1 + to_add - added).max(0);
    }
    sizes
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    let now = krate_client::now();
    json!({"type": type_, "status": status, "reason": reason, "message": message, "lastUpdateTime": now, "lastTransitionTime": now})
}

/// The proportional sizes when the Deployment was resized (an active ReplicaSet's
/// desired-replicas annotation is not `wanted`) with several ReplicaSets active and the
/// new one not yet saturated, as upstream's `isScalingEvent` and `scale`.
fn scaling_event(
    owned: &[ReplicaSet],
    wanted: i32,
    surge: i32,
    new: &ReplicaSet,
    d: &Deployment,
) -> Option<Vec<(String, i32)>> {
    let active: Vec<&ReplicaSet> = owned.iter().filter(|rs| spec_replicas(rs) > 0).collect();
    let resized = active.iter().any(|rs| rs.annotations().get(DESIRED).is_some_and(|w| *w != wanted.to_string()));
    let saturated = spec_replicas(new) == wanted && status_of(new).2 >= wanted;
    if !resized || active.len() < 2 || saturated {
        return None;
    }
    let status_replicas = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    Some(proportional_sizes(&active, wanted, surge, status_replicas))
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = d.namespace().unwrap_or_default();
    let spec = d.spec.clone();
    let wanted = spec.replicas.unwrap_or(1);
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = d.uid().unwrap_or_default();
    let selector = label_selector_string(&serde_json::to_value(&spec.selector)?);
    let Some(mut owned) = ctx.replica_sets.of(&uid, Some(&selector)) else {
        return Ok(Action::requeue(CACHE_LAG_RETRY));
    };
    // ReplicaSets nobody controls whose labels match are adopted (their revisions count).
    for rs in ctx.replica_sets.orphans(&ns, &selector) {
        let mut refs = rs.owner_references().to_vec();
        refs.push(crate::owned::controller_reference(&*d, &()));
        let adopted = crate::owned::set_owner_references(&rs_api, &rs, refs).await?;
        ctx.replica_sets.updated(&uid, &rs, &adopted);
        owned.push(adopted);
    }
    owned.sort_by_key(|rs| rs.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()));
    let template = serde_json::to_value(&spec.template)?;
    let max_revision = owned.iter().map(revision).max().unwrap_or(0);
    let mut new_rs = owned.iter().find(|rs| comparable_template(rs) == template).cloned();
    let surge = scaled(
        spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref()).and_then(|r| r.max_surge.as_ref()),
        wanted,
        "25%",
        true,
    );
    let mut unavailable = scaled(
        spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref()).and_then(|r| r.max_unavailable.as_ref()),
        wanted,
        "25%",
        false,
    );
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let paused = spec.paused == Some(true);

    match &new_rs {
        // A template seen before (rollback): it becomes the newest revision again.
        Some(rs) if revision(rs) < max_revision && !paused => {
            let patch = json!({"metadata": {"annotations": {REVISION: (max_revision + 1).to_string()}}});
            let after = rs_api.patch(&rs.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
            ctx.replica_sets.updated(&uid, rs, &after);
            new_rs = Some(after);
        }
        Some(_) => {}
        None if paused => {}
        None => {
            let old_total: i32 = owned.iter().map(spec_replicas).sum();
            let initial = if recreate || owned.is_empty() {
                if recreate && old_total > 0 {
                    0
                } else {
                    wanted
                }
            } else {
                (wanted + surge - old_total).clamp(0, wanted)
            };
            let collisions = d.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0) as i64;
            let rs = new_replica_set(&d, &template, &template_hash(&template, collisions), initial, max_revision + 1)?;
            match rs_api.create(&PostParams::default(), &rs).await {
                Ok(created) => {
                    ctx.replica_sets.created(&uid, &created);
                    scaled_event(&ctx, &d, &created.name_any(), 0, initial).await;
                    owned.push(created.clone());
                    new_rs = Some(created);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    // The name is taken by a ReplicaSet with another template: a hash collision.
                    let status = json!({"status": {"collisionCount": collisions + 1}});
                    Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                        .patch_status(&d.name_any(), &PatchParams::default(), &Patch::Merge(status))
                        .await?;
                    return Ok(Action::requeue(Duration::from_millis(10)));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    // The Deployment carries its current revision, as upstream (kubectl rollout undo
    // patches it).
    if let Some(rev) = new_rs.as_ref().map(revision).filter(|r| *r > 0) {
        if d.annotations().get(REVISION) != Some(&rev.to_string()) {
            let patch = json!({"metadata": {"annotations": {REVISION: rev.to_string()}}});
            Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                .patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(patch))
                .await?;
        }
    }
    let new_name = new_rs.as_ref().map(|rs| rs.name_any());
    let old: Vec<&ReplicaSet> = owned.iter().filter(|rs| Some(rs.name_any()) != new_name).collect();

    if !paused {
        if let Some(new) = &new_rs {
            let new_spec = spec_replicas(new);
            if recreate {
                for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
                    scale(&ctx, &rs_api, rs, 0, &d, wanted).await?;
                }
                let old_running: i32 = old.iter().map(|rs| status_of(rs).0).sum();
                if old_running == 0 && new_spec != wanted {
                    scale(&ctx, &rs_api, new, wanted, &d, wanted).await?;
                }
            } else if let Some(sizes) = scaling_event(&owned, wanted, surge, new, &d) {
                // Resized mid-rollout: every active ReplicaSet grows or shrinks in
                // proportion; the rollout goes on from there at the next pass.
                for (name, size) in sizes {
                    if let Some(rs) = owned.iter().find(|rs| rs.name_any() == name) {
                        scale(&ctx, &rs_api, rs, size, &d, wanted + surge).await?;
                    }
                }
            } else {
                // Pods of a ReplicaSet that was just scaled down still count until they
                // are gone, so observed pods never exceed wanted + maxSurge.
                let total: i32 = owned.iter().map(|rs| spec_replicas(rs).max(status_of(rs).0)).sum();
                // Scale up the new ReplicaSet within maxSurge.
                if new_spec < wanted {
                    let room = wanted + surge - total;
                    if room > 0 {
                        scale(&ctx, &rs_api, new, (new_spec + room).min(wanted), &d, wanted + surge).await?;
                    }
                } else if new_spec > wanted {
                    scale(&ctx, &rs_api, new, wanted, &d, wanted + surge).await?;
                }
                // Scale down old ReplicaSets while keeping wanted - maxUnavailable available.
                // A ReplicaSet's status may predate its last scale-down; never count
                // more available pods than it is meant to keep.
                let available: i32 = owned.iter().map(|rs| status_of(rs).2.min(spec_replicas(rs))).sum();
                let mut can_remove = available - (wanted - unavailable);
                // Old pods that are not available do not count against the budget.
                for rs in &old {
                    let unavailable_old = (spec_replicas(rs) - status_of(rs).2).max(0);
                    can_remove += unavailable_old;
                }
                for rs in &old {
                    if can_remove <= 0 {
                        break;
                    }
                    let current = spec_replicas(rs);
                    if current == 0 {
                        continue;
                    }
                    let remove = current.min(can_remove);
                    scale(&ctx, &rs_api, rs, current - remove, &d, wanted + surge).await?;
                    can_remove -= remove;
                }
            }
        }
        // Keep revisionHistoryLimit old, empty ReplicaSets.
        let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let mut empty: Vec<&&ReplicaSet> =
            old.iter().filter(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0).collect();
        empty.sort_by_key(|rs| revision(rs));
        if empty.len() > limit {
            for rs in &empty[..empty.len() - limit] {
                let _ = rs_api.delete(&rs.name_any(), &DeleteParams::background()).await;
                ctx.replica_sets.deleted(&uid, rs);
            }
        }
    }

    // Status, from what the ReplicaSets report.
    let replicas: i32 = owned.iter().map(|rs| status_of(rs).0).sum();
    let ready: i32 = owned.iter().map(|rs| status_of(rs).1).sum();
    let available: i32 = owned.iter().map(|rs| status_of(rs).2).sum();
    let updated = new_rs.as_ref().map(|rs| status_of(rs).0).unwrap_or(0);
    let complete = updated == wanted && replicas == wanted && available == wanted;
    let available_condition = if available >= wanted - unavailable {
        condition("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
    } else {
        condition("Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
    };
    let current = d.status.clone().unwrap_or_default();
    let counts_same = current.replicas == Some(replicas)
        && current.ready_replicas.unwrap_or(0) == ready
        && current.available_replicas.unwrap_or(0) == available
        && current.updated_replicas.unwrap_or(0) == updated
        && current.observed_generation == d.metadata.generation;
    // progressDeadlineSeconds: a rollout that makes no progress (no count changes) for
    // that long is marked ProgressDeadlineExceeded, and again progressing once it moves.
    let old_progressing = current.conditions.iter().flatten().find(|c| c.type_.as_deref() == Some("Progressing"));
    let last_progress = old_progressing
        .filter(|c| counts_same && c.reason.as_deref() == Some("ReplicaSetUpdated"))
        .and_then(|c| c.last_update_time.as_ref().map(|t| t.0));
    let deadline = spec.progress_deadline_seconds.filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64));
    let still_stalled =
        counts_same && old_progressing.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    let overdue = still_stalled
        || match (deadline, last_progress) {
            (Some(deadline), Some(at)) => {
                jiff::Timestamp::now().duration_since(at).as_secs() >= deadline.as_secs() as i64
            }
            _ => false,
        };
    let mut progressing = match (&new_name, complete, paused) {
        (_, _, true) => condition("Progressing", "Unknown", "DeploymentPaused", "Deployment is paused"),
        (Some(n), true, _) => condition(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet \"{n}\" has successfully progressed."),
        ),
        (Some(n), false, _) if overdue => condition(
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            &format!("ReplicaSet \"{n}\" has timed out progressing."),
        ),
        (Some(n), false, _) => {
            condition("Progressing", "True", "ReplicaSetUpdated", &format!("ReplicaSet \"{n}\" is progressing."))
        }
        (None, _, _) => condition("Progressing", "Unknown", "NoReplicaSet", "no ReplicaSet yet"),
    };
    // No progress since the last update: keep its time, so the deadline counts from it.
    if let (Some(at), Some("ReplicaSetUpdated")) = (last_progress, progressing["reason"].as_str()) {
        progressing["lastUpdateTime"] = json!(at.to_string());
        progressing["lastTransitionTime"] = json!(old_progressing
            .map(|c| c.last_transition_time.as_ref().map(|t| t.0.to_string()))
            .unwrap_or_default());
    }
    // Wake up when the deadline passes without any event.
    let wake = match (deadline, progressing["reason"].as_str()) {
        (Some(deadline), Some("ReplicaSetUpdated")) => {
            let since = last_progress.map_or(0, |at| jiff::Timestamp::now().duration_since(at).as_secs().max(0) as u64);
            Action::requeue(deadline.saturating_sub(Duration::from_secs(since)) + Duration::from_secs(1))
        }
        _ => Action::await_change(),
    };
    let same_condition = |c: &Value| {
        current.conditions.iter().flatten().any(|old| {
            old.type_.as_deref() == c["type"].as_str()
                && old.status.as_deref() == c["status"].as_str()
                && old.reason.as_deref() == c["reason"].as_str()
        })
    };
    if !(counts_same && same_condition(&available_condition) && same_condition(&progressing)) {
        let status = json!({"status": {
            "replicas": replicas, "readyReplicas": ready, "availableReplicas": available, "updatedReplicas": updated,
            "unavailableReplicas": (wanted - available).max(0), "observedGeneration": d.metadata.generation,
            "conditions": [available_condition, progressing],
        }});
        Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&d.name_any(), &PatchParams::default(), &Patch::Merge(status))
            .await?;
    }
    Ok(wake)
}

fn error_policy(d: Arc<Deployment>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(deployment = %d.name_any(), error = %err, "deployment sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let replica_sets = Informer::<ReplicaSet>::default();
    let events = Recorder::new(client.clone(), "deployment-controller");
    let context = Context { events, client: client.clone(), replica_sets: Owned::new(&replica_sets) };
    let controller = Controller::new(Api::<Deployment>::all(client.clone()), watcher::Config::default())
        .owns_shared_stream(context.replica_sets.changes())
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|_| futures::future::ready(()));
    beside(&replica_sets, Api::all(client), controller).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn a_resize_mid_rollout_is_spread_in_proportion() {
        // Upstream's conformance case: 10 replicas, surge 3, stuck rollout at 8 old + 5
        // new; resized to 30: 20 old and 13 new.
        let rs = |name: &str, replicas: i32, created: &str| -> ReplicaSet {
            serde_json::from_value(json!({"metadata": {"name": name, "creationTimestamp": created,
                "annotations": {DESIRED: "10", MAX: "13"}}, "spec": {"replicas": replicas, "selector": {}}}))
            .unwrap()
        };
        let (old, new) = (rs("old", 8, "2026-01-01T00:00:00Z"), rs("new", 5, "2026-01-02T00:00:00Z"));
        let sizes = proportional_sizes(&[&old, &new], 30, 3, 13);
        assert_eq!(sizes, vec![("old".to_string(), 20), ("new".to_string(), 13)]);
        // And back down to 10: 8 and 5 again.
        let (old, new) = (rs("old", 20, "2026-01-01T00:00:00Z"), rs("new", 13, "2026-01-02T00:00:00Z"));
        let old = ReplicaSet {
            metadata: ObjectMeta { annotations: Some([(MAX.to_string(), "33".to_string())].into()), ..old.metadata },
            ..old
        };
        let new = ReplicaSet {
            metadata: ObjectMeta { annotations: Some([(MAX.to_string(), "33".to_string())].into()), ..new.metadata },
            ..new
        };
        assert_eq!(proportional_sizes(&[&old, &new], 10, 3, 33), vec![("old".to_string(), 8), ("new".to_string(), 5)]);
    }

    #[test]
    fn surge_rounds_up_and_unavailable_rounds_down() {
        assert_eq!(scaled(None, 10, "25%", true), 3);
        assert_eq!(scaled(None, 10, "25%", false), 2);
        assert_eq!(scaled(Some(&IntOrString::Int(1)), 10, "25%", true), 1);
        assert_eq!(scaled(Some(&IntOrString::String("50%".into())), 3, "25%", false), 1);
    }

    #[test]
    fn template_hashes_are_stable_and_distinct() {
        let a = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx:1"}]}});
        let b = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx:2"}]}});
        assert_eq!(template_hash(&a, 0), template_hash(&a, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&b, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&a, 1));
        assert_eq!(template_hash(&a, 0).len(), 10);
    }
}
